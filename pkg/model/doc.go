// Package model is the Qwen2 and Qwen2-MoE forward pass, written once against
// the kernels.Backend interface: every dense size (0.5B, 1.5B, 7B, 72B) and
// the mixture-of-experts 57B-A14B differ only by Config.
//
// # The computation (qwen2.md section 2)
//
//	x = Embed(ids)
//	for each layer:
//	    a = RMSNorm(x)                              input_layernorm
//	    q, k, v = a·Wqᵀ+bq, a·Wkᵀ+bk, a·Wvᵀ+bv      biases on q/k/v only
//	    RoPE(q), RoPE(k)                            rotate-half, rope_theta, YaRN
//	    cache[slots] = k, v                         paged KV cache, after RoPE
//	    x += Attention(q, cache)·Woᵀ                causal, GQA, no o bias
//	    m = RMSNorm(x)                              post_attention_layernorm
//	    x += FFN(m)                                 SwiGLU MLP, or the MoE block
//	logits = RMSNorm(x)·W_lmᵀ                       W_lm = embedding when tied
//
// With Dual Chunk Attention (dual_chunk_attention_config; qwen2.md 2.8,
// docs/long-context.md) the keys are rotated at p mod c instead of p and
// each query three ways (RoPEMulti: intra, successive and inter chunk
// positions, DualChunkAttention.Positions); Attention picks the variant
// per key by chunk. The cache still holds one K and one V per token.
//
// The MoE block: a float32 softmax router over all experts, top-k (weights
// renormalised only when norm_topk_prob), each token's rows gathered to the
// experts that chose it and scatter-added back weighted, plus the shared
// expert gated by sigmoid(m·Wsgᵀ).
//
// All arithmetic is float32 on weights widened exactly from their checkpoint
// dtype; that reproduces the HuggingFace reference in float32 to about 1e-5.
//
// # A step
//
// Forward runs one batched step: several sequences, each contributing the
// tokens it has not yet run (a whole prompt, a chunk of one, or the single
// token of a decode step) together with its KV block table. The K/V of the
// new tokens are written into the cache, and each new token attends to all
// earlier positions of its own sequence. So prefill, chunked prefill and
// decode are the same call, and a mixed batch computes exactly what each
// sequence would compute alone.
//
//	st := kvcache.NewStorage(backend, m.NumLayers(), blocks, 16, m.KVDim())
//	bm := kvcache.NewBlockManager(blocks, 16)
//	bm.Reserve(seq, len(prompt))
//	out, err := m.Forward(&model.Batch{Seqs: []model.Seq{{Tokens: prompt, Blocks: bm.Table(seq)}}}, st)
//	// out.Logits[0] is the last position's logits; sample, Reserve one more, repeat with Pos = len(prompt).
//
// Greedy wraps that loop for one sequence.
package model
