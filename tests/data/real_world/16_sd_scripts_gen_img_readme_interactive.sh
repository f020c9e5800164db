python gen_img.py --ckpt <model_name> --outdir <image_output_destination> --xformers --fp16 --interactive
