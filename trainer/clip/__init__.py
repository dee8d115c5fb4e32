"""clipforge's shared library: the model API and the on-disk contracts, imported by every stage.

    configs, model, resnet   CLIPConfig presets and the CLIP model (pure torch, OpenAI / open_clip key names)
    tokenizer, transform     the CLIP BPE tokenizer and the image preprocessing / training augmentation
    checkpoint, convert      clipforge checkpoints, and OpenAI / open_clip / Hugging Face weights both ways
    formats                  the stage-to-stage file contracts (crawl, ledger, shards, index) and atomic writes
    flags                    command lines built from config dataclasses (every stage's CLI)
    ports                    free_port

pipeline/, trainer/ and indexing/ import this package, never each other's internals; it imports neither
deepspeed nor ray. Submodules are imported on demand (`from trainer.clip.checkpoint import load_pretrained`), so a
stage that only needs a file contract does not pay for torch.
"""
