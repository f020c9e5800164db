python gen_img.py --ckpt model.safetensors \
    --scale 8 --steps 48 --outdir txt2img --xformers \
    --W 512 --H 768 --fp16 --sampler k_euler_a \
    --textual_inversion_embeddings goodembed.safetensors negprompt.pt \
    --network_module networks.lora networks.lora \
    --network_weights model1.safetensors model2.safetensors \
    --network_mul 0.4 0.8 \
    --clip_skip 2 --max_embeddings_multiples 1 \
    --batch_size 8 --images_per_prompt 1 --interactive
