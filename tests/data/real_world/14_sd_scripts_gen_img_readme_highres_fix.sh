python gen_img.py  --ckpt trinart_characters_it4_v1_vae_merged.ckpt\
    --n_iter 1 --scale 7.5 --W 1024 --H 1024 --batch_size 1 --outdir ../txt2img \
    --steps 48 --sampler ddim --fp16 \
    --xformers \
    --images_per_prompt 1  --interactive \
    --highres_fix_scale 0.5 --highres_fix_steps 28 --strength 0.5
