python gen_img.py --ckpt trinart_characters_it4_v1_vae_merged.ckpt \
    --outdir outputs --xformers --fp16 --scale 12.5 --sampler k_euler --steps 32 \
    --image_path template.png --strength 0.8 \
    --prompt "1girl, cowboy shot, brown hair, pony tail, brown eyes, \
          sailor school uniform, outdoors \
          --n lowres, bad anatomy, bad hands, error, missing fingers, cropped, \
          worst quality, low quality, normal quality, jpeg artifacts, (blurry), \
          hair ornament, glasses" \
    --batch_size 8 --images_per_prompt 32
