"""Training-based mitigation: methods that change a model's weights once, so that decoding afterwards costs nothing
extra. `alea/` is ALEAHallu (locate hallucination-prone parameters, learn an adversarial prefix, edit them); `apasi/` is
APASI (preference pairs from self-injected hallucinations, then DPO with LoRA)."""
