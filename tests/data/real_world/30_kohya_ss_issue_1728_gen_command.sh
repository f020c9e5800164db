python sdxl_gen_img.py \
    --ckpt /data/lianshuailong/controlnets_out/mask_control_v0.0-000090.safetensors \
    --guide_image_path /nvme/pretrain-nvme-pvc-03d06c2e-25a2-440c-bdc0-630295d4081b/wumingyu/train_controlnet/control_images/030ba899a14541398c0993ba8ea0eebb_01e19de5-d100-5253-480f-765d0cc74665_src.png \
    --prompt "there is a mannequin with a bodysuit on it and a body of a woman, on a mannequin.high resolution,slim female figure,kaki body suit, metallic neoprene woman, perfect female body silhouette, full extremely slim body, feminine slim figure, photo of slim girl model, women full body, navy leotard costume, full body female" \
    --outdir './sdxl_control_res'
