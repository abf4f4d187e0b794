"""Tiny random model configs shared by the tests: 2 layers, hidden 16 — built in-process, nothing downloaded.

The loader sizes the vocabulary to the tokenizer (the in-process byte tokenizer by default).
"""

TINY_CONFIGS = {
    arch: {
        "model_type": arch,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    for arch in ("llama", "qwen2")
}
TINY_LLAMA = TINY_CONFIGS["llama"]
#: bitsandbytes' CPU 4-bit kernels need each quantized layer's output size to be a multiple of 32 and its input
#: size a multiple of the quantization block (64).
TINY_QLORA = {**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
