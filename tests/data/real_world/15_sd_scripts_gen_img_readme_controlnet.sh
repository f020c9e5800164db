python gen_img.py --ckpt model_ckpt --scale 8 --steps 48 --outdir txt2img --xformers \
    --W 512 --H 768 --bf16 --sampler k_euler_a \
    --control_net_models diff_control_sd15_canny.safetensors --control_net_weights 1.0 \
    --guide_image_path guide.png --control_net_ratios 1.0 --interactive
