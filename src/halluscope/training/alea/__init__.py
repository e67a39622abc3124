"""ALEAHallu (Hu et al., "Look Closer! An Adversarial Parametric Editing Framework for Hallucination Mitigation in
VLMs", arXiv 2512.21999): locate hallucination-prone parameters, learn an adversarial soft prefix that makes the
model neglect the image, then edit only the located parameters to resist it.

    from halluscope.training.alea.step import edit_step, locate_step
    located = locate_step("runs/located", model="organism-scenes", images="synthetic", n=200)
    edit_step("runs/edited", located="runs/located", model="organism-scenes")   # load_vlm("runs/edited")

Modules: `activations` (grounded vs hallucinated pairs from the model's own replies), `sequences` (teacher-forced
batches, NLL and KL), `locate` (differential hidden states, layers, parameters), `prefix` (the soft prefix and its
training), `optimise` (the deterministic resumable loop), `edit` (the edit's loss and hyper-parameters), `step`
(the two stages as run directories).
"""
