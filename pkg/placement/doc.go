// Package placement plans how a Qwen2 model is laid out on workers:
// model config + workers → replicas → pipeline stages → tensor-parallel
// ranks, with the reasons. It is pure and deterministic: no I/O, no clock,
// and the same inputs in any order give the same Plan. The coordinator
// runs it and writes the result; workers receive their slice.
//
//	plan, err := placement.New(cfg, workers, placement.Options{Model: "qwen2-72b"})
//	// plan.TP=4, plan.PP=1, two replicas on 8×80 GiB; plan.Explain says why
//
// # Layout
//
// A replica is PP stages of TP ranks (g = TP·PP workers; with expert
// parallelism EP ranks, g = EP·PP, see below). Stage s holds the
// contiguous layers [LayersBegin, LayersEnd); stage 0 holds the embedding,
// the last stage the final norm and LM head. Within a stage, TP rank r
// holds (qwen2.md section 5.1):
//
//   - q/k/v/gate/up rows and biases [r·out/t, (r+1)·out/t) (column split),
//     o/down columns likewise (row split), every expert and the shared
//     expert the same way (no expert parallelism); norms, router and
//     shared-expert gate whole;
//   - KV heads [r·kv/t, (r+1)·kv/t), or when t > kv one head, ⌊r·kv/t⌋
//     (each head replicated t/kv times: per-rank KV stops shrinking);
//   - embedding / LM-head rows model.VocabSlice(V, r, t) = [r·⌈V/t⌉,
//     min(V, (r+1)·⌈V/t⌉)). A tied model's last stage, when it is not also
//     the first, holds its own copy of its embedding rows as the LM head,
//     as vLLM does.
//
// Worked example, 72B on two hosts of 4 GPUs with TP=2, PP=2 forced:
//
//	replica 0  stage 0 (embed, layers 0-39)   tp0 w0@host0  tp1 w1@host0
//	           stage 1 (layers 40-79, head)   tp0 w2@host0  tp1 w3@host0
//	replica 1  stage 0                        tp0 w4@host1  tp1 w5@host1
//	           stage 1                        tp0 w6@host1  tp1 w7@host1
//
// # Expert parallelism
//
// A qwen2_moe stage may instead have G = EP > 1 ranks (Plan.EP; 1 means
// none). Rank i of the stage has EPRank i and TPRank i % TP: attention is
// split as above over groups of TP consecutive ranks (TP divides EP; TP=1:
// every rank holds the whole attention), and everything else is split
// over all G ranks:
//
//   - routed experts whole: ⌈E/G⌉ + Options.RedundantExperts per rank per
//     MoE layer (contiguous blocks [r·E/G, (r+1)·E/G) by default; the
//     redundant slots are for the expert load balancer to replicate hot
//     experts into); router and shared-expert gate whole;
//   - the shared expert, and dense layers' MLP, sliced G ways like TP;
//   - embedding / LM head rows model.VocabSlice(V, i, G);
//   - KV heads as for TP: per rank the cache of tp=TP.
//
// 57B-A14B (28 heads, 4 KV heads) on 8 ranks: ep=8 tp=4, 8 experts per
// rank per layer, 13.57 GiB of weights per rank; ep=4 tp=4: 26.74 GiB;
// ep=2 tp=2: 53.47 GiB, the same as tp=2 (the same slices, experts whole
// instead of cut).
//
// # Valid degrees
//
// t is valid when it divides the query heads, t and the KV heads divide one
// another, t divides intermediate_size (when any layer is dense) and, for
// MoE, moe_intermediate_size and shared_expert_intermediate_size, and t ≤
// num_experts. PP is 1…L; every stage gets at least one layer.
//
// EP > 1 is valid for a qwen2_moe model when TP is valid (above), EP is a
// multiple of TP, EP ≤ num_experts, EP divides
// shared_expert_intermediate_size and (when any layer is dense)
// intermediate_size, every rank gets vocabulary rows, and ⌈E/EP⌉ +
// RedundantExperts ≤ E.
//
// # Memory per rank
//
// Checked against Utilization × the smallest worker's memory (every rank is
// sized for the smallest worker, so the check does not depend on who lands
// where):
//
//	weights = the rank's slices above × WeightBytesPerParam
//	kv      = KVCacheTokens × 2 (K,V) × stage layers × kv heads per rank × head_dim × 2 (bf16)
//	acts    = MaxBatchTokens × (4·H + (nh/t + 2·kv_rank)·hd + 2·F/w) × 4 (f32)
//	          + on the head stage MaxBatchSeqs × V × 4 (gathered logits)
//
// where t is the attention TP degree, w the stage's ranks (t, or G with
// expert parallelism: routed rows spread evenly over the ranks) and F the
// widest MLP intermediate of the stage (I, or for MoE top-k ×
// moe_intermediate_size + shared_expert_intermediate_size). The
// activation term is an estimate of one step's float32 working set
// (residual, normed input, attention and MLP outputs, q/k/v, gate/up), not
// a measurement.
//
// # Stage balance
//
// Stages minimise the largest stage's weight bytes per rank (layers, plus
// embedding on the first and final norm + LM head on the last). Among the
// partitions reaching that minimum the earlier stages get the most layers.
// 72B pp=4 splits 19/21/21/19: the embedding and the LM head each weigh
// about 1.4 layers.
//
// # Choice
//
// Workers are grouped by Backend; the largest group is planned (ties: the
// name first in order) and the others are Unused. When neither TP nor PP
// is forced the rule is "TP inside a host, PP across hosts", in two
// phases:
//
//  1. Only pp=1 layouts whose TP groups form inside hosts (t workers of
//     one host each; a TP group never spans hosts, and workers that cannot
//     join such a group are Unused). If any fits, the one giving the most
//     replicas wins (ties: the larger tp), and pipelines are not
//     considered even where one would give more replicas: Explain says
//     "tp=4 inside one host fits; pipeline layouts not needed".
//  2. Otherwise every layout is a candidate, groups of up to the whole
//     pool: those whose TP groups all stay inside hosts first (the
//     pipeline crosses hosts instead), then the most replicas (⌊n/g⌋ for
//     g = tp·pp), then the largest g giving that many (more headroom,
//     fewer idle workers), then the fewest TP groups spanning hosts, then
//     the larger tp (a shorter pipeline has less bubble). Explain says why
//     phase 1 failed ("no tensor-parallel group inside one host fits (tp=2
//     needs 74.92 GiB per rank, …); pipeline stages across hosts").
//
// Qwen2-72B on 80 GiB GPUs: 8 or 16 on one or two hosts give tp=4 replicas
// (phase 1); 8 hosts of one GPU give tp=1 × pp=4, two replicas (phase 2).
//
// For a qwen2_moe model with neither TP nor EP forced the stage shapes
// are expert-parallel instead: a stage of g ranks is one worker holding
// everything (g=1) or ep=g with attention at the largest valid tp
// dividing g, for each g dividing num_experts (57B: ep=2 tp=2, ep=4 tp=4,
// ep=8 tp=4, …). The same two phases pick among them, "TP" reading "the
// stage's group": 57B on 8×80 GiB gives four ep=2 tp=2 replicas, on
// 4×141 GiB four single-worker replicas. EP=1 plans as for a dense model
// (experts tensor-sliced over the TP ranks), and so does a forced TP
// without EP.
//
// When TP, PP or EP is forced, the forced degree is kept or the plan
// fails, and the other is chosen by the shortest-group rule: the smallest
// group size g that fits, then the largest g giving the same number of
// replicas; among layouts of that g the fewest TP (or EP) groups spanning
// hosts, then the wider stage. A forced EP without TP takes the largest
// valid tp dividing it.
//
// # Assignment
//
// Workers are sorted by (Host, ID); workers without a Host share one
// unnamed host. Stage groups (TP groups, or EP groups of G) take t (G)
// workers of one host, host by host; the hosts' leftovers, in the same
// order, form groups across hosts (not in phase 1, where they are
// Unused). A replica takes
// PP consecutive groups (stage s = group s), so a pipeline crosses hosts
// only where a host runs out. Workers left over are Unused.
package placement
