// Package expertparallel places the routed experts of a Qwen2-MoE model on
// the ranks of an expert-parallel pipeline stage, measures how evenly the
// routed tokens load those ranks, and moves and replicates experts to even
// the load out, in the manner of DeepSeek's EPLB and vLLM's EPLB. It is
// pure and deterministic: no I/O, no clock, no gRPC or etcd (the combine
// runs over an Exchanger the caller provides). The
// coordinator owns the Table of each stage; a worker's model reads it
// through pkg/model's ExpertMap interface (Holds, Owner), which *Table
// satisfies. The contiguous layout is pkg/model's (model.Contiguous, what
// a shard uses without a table); Contiguous writes it out as a Table.
//
//	table, _ := expertparallel.Contiguous(L, E, G)      // the first layout
//	stats := expertparallel.NewStats(L, E)
//	// every step: stats.Add(the step's tokens per layer and expert)
//	// every window:
//	counts := stats.Counts()
//	next, _ := expertparallel.Rebalance(counts, G, slots)
//	if next.Imbalance(counts) < table.Imbalance(counts) { /* publish next.Flat(), switch at a step boundary */ }
//	stats.Reset()
//
// # Layout
//
// A replica of the model is pipeline stages, a stage G ranks. In a stage
// of a Qwen2-MoE with expert parallelism:
//
//   - Attention is tensor parallel over groups of TP consecutive ranks (TP
//     divides G; TP = 1: every rank runs the whole attention). Every group
//     runs attention for every token of the step, so after it every rank
//     holds every token's hidden state.
//   - The E routed experts of each layer are whole and split across all G
//     ranks: Table.Owners[layer][expert] lists the ranks holding the
//     expert. Layers are the model's global indices 0…L-1. Contiguous is
//     the default, rank r holding experts [r·E/G, (r+1)·E/G), one copy
//     each. A rebalanced table may hold an expert on several ranks
//     (replicas), each rank with up to Slots experts per layer.
//   - The shared expert is sliced G ways like a dense MLP (gate/up rows,
//     down columns [r·Is/G, (r+1)·Is/G)); the router and the shared-expert
//     gate are whole on every rank.
//
// Qwen2-57B-A14B (E=64, top-8, Is=20480) on a stage of G=4 with TP=2,
// contiguous:
//
//	rank 0  attention group 0 tp0   experts  0-15   shared rows [0, 5120)
//	rank 1  attention group 0 tp1   experts 16-31   shared rows [5120, 10240)
//	rank 2  attention group 1 tp0   experts 32-47   shared rows [10240, 15360)
//	rank 3  attention group 1 tp1   experts 48-63   shared rows [15360, 20480)
//
// # One step's MoE block
//
//  1. Route. Every rank runs the router on every token row (it holds them
//     all) and takes the same top-k experts and weights, so the ranks agree
//     on the routing without exchanging it.
//  2. Dispatch. Rank r gathers, for each expert it holds, the rows routed
//     to that expert with Owner(layer, expert, row) = r. Dispatch costs no
//     bytes in this layout: the rows are already on every rank (compare the
//     dispatch all-to-all of qwen2.md 5.6). The replicas of an expert split
//     its tokens round-robin by row (Owner is Owners[row % replicas]):
//     each computes about count/replicas of them, the share RankLoad
//     assumes.
//  3. Compute. Each rank runs its experts on their gathered rows and adds
//     each output, times the token's router weight, into its partial
//     output for that row; it adds its slice of the gated shared expert
//     (itself a partial sum) for every row.
//  4. Combine. The partial outputs are summed over the stage: an
//     all-to-all sends each rank's partial rows to the tokens' home ranks,
//     which add them (a reduce-scatter), and the summed rows are
//     all-gathered, so every rank again holds the whole layer output for
//     the next layer. The bytes are those of an all-reduce of the layer
//     output, however many experts each token picks. Stage.ReduceStage
//     does this over an Exchanger (the workers' Exchange streams, or
//     model.LocalExchangers in one process); rows a rank holds no part of
//     do not travel from it.
//
// Every expert use is computed by exactly one rank, so all ranks of a
// stage must use the same Table in a step. The block waits for its
// slowest rank; a rank's load is the token rows it computes, and
// Imbalance (max/mean over ranks) is how much longer the routed experts
// take than they would perfectly balanced.
//
// # Balancing
//
// Routing depends on the tokens, and a few hot experts can draw most of
// them: under the contiguous layout the rank holding them does most of the
// work. The routing, and so a step's count of tokens per layer and expert,
// is the same on every rank. Stats accumulates those counts over a window;
// Rebalance turns them into a new Table (see its comment for the
// algorithm): with the same slots per rank (⌈E/G⌉) it only moves experts
// between ranks; each slot beyond that holds a replica of a hot expert, at
// the cost of one expert's weights per layer per rank (55 MB in bf16 for
// 57B-A14B, 1.5 GB over its 28 layers). On the skewed workload of
// ExampleRebalance (64 experts on 4 ranks; in one layer expert i gets
// 1000/(i+1) tokens, in the other expert 63-i does) the imbalance goes from 2.86 (contiguous) to 1.09 (16 slots)
// and 1.00 (17 slots).
//
// The coordinator applies a new Table at a step boundary, without a
// restart: the ranks first load the experts they gain, every rank of the
// stage switches to the new Table between the same two steps, and the
// ranks then free the experts they lost. Flat and FromFlat carry a Table
// in a protobuf repeated int32 field; FromFlat checks hostile input.
package expertparallel
