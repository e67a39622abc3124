"""The scenes organism: a tiny Qwen2-VL that describes synthetic object scenes and answers "Is there a ...?", and
names absent objects that co-occur with present ones, because its training captions and answers do
(`load_vlm("organism-scenes")`). Its recipe, training data, behaviour measurement and model card live here;
the shipped checkpoint in `checkpoint/`.
"""
