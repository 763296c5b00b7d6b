"""PyTorch eager baseline of the CUDA backend's benchmark (scripts/device-check.sh run).

2-layer qwen2-7b and qwen2-72b (real widths and vocabulary, random bf16
weights) with transformers' Qwen2ForCausalLM on cuda:0: prefill of a
128-token prompt, then greedy decode at batch 1 through the KV cache.
Prints tokens/s of each, like BenchmarkDecode in pkg/kernels/cuda.
"""
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

SHAPES = {
    "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
    "qwen2-72b": dict(hidden_size=8192, intermediate_size=29568, num_attention_heads=64, num_key_value_heads=8, vocab_size=152064),
}


def run(name, shape, steps=64, prompt_len=128):
    cfg = Qwen2Config(num_hidden_layers=2, max_window_layers=2, tie_word_embeddings=False, rope_theta=1e6,
                      rms_norm_eps=1e-6, torch_dtype="bfloat16", **shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 151000, (1, prompt_len), device="cuda")
    with torch.no_grad():
        for _ in range(2):  # warm-up
            model(ids, use_cache=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t0
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        for _ in range(steps):
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        per = (time.perf_counter() - t1) / steps
    params = sum(p.numel() for p in model.parameters())
    print(f"torch {name}-2layers: decode {1 / per:.1f} tok/s ({per * 1e3:.2f} ms/token, {params * 2 / 1e9:.2f} GB of weights), "
          f"prefill {prompt_len / prefill:.0f} tok/s")
    del model, past, out
    torch.cuda.empty_cache()


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(0))
    for name, shape in SHAPES.items():
        run(name, shape)
