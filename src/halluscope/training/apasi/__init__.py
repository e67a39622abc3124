"""APASI (Autonomous Preference Alignment via Self-Injection, EMNLP 2025): a model's own descriptions as the
preferred responses, the same descriptions with self-injected hallucinations as the dis-preferred ones, then DPO
with LoRA, in rounds that regenerate the data with the improved model.

    from halluscope.training.apasi.data import apasi_data_step
    from halluscope.training.apasi.train import apasi_train_step
    apasi_data_step("runs/apasi-data", model="organism-scenes", images="synthetic", n=600)
    apasi_train_step("runs/apasi", model="organism-scenes", data="runs/apasi-data")

Modules: `sources` (images and their vocabulary), `sentences` (splitting and the weighted choice of sentences),
`graph` (object mentions, co-occurrence graph, the model's phrasings), `inject` (where each hallucination goes),
`continuation` (the model's blind continuation), `data` (the data run), `dpo` (one DPO round with TRL and PEFT),
`train` (the rounds and the checkpoint).
"""
