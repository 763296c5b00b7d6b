package expertparallel

import "fmt"

// RankLoad is the tokens each rank computes per layer, [layer][rank], when
// counts[l][e] tokens are routed to expert e of layer l: each replica of an
// expert takes an equal share counts/len(owners). Owner splits rows
// round-robin by row index, which gives equal shares on average but not
// exactly (rows 0, 2 and 4 all go to the first of two replicas). counts
// must have t's shape; RankLoad panics otherwise, as a programming error
// (Stats.Add and Rebalance return errors for bad shapes).
func (t *Table) RankLoad(counts [][]int64) [][]float64 {
	t.checkShape(counts)
	load := make([][]float64, len(t.Owners))
	for l, layer := range t.Owners {
		load[l] = make([]float64, t.Ranks)
		for e, owners := range layer {
			share := float64(counts[l][e]) / float64(len(owners))
			for _, r := range owners {
				load[l][r] += share
			}
		}
	}
	return load
}

func (t *Table) checkShape(counts [][]int64) {
	if len(counts) != len(t.Owners) {
		panic(fmt.Sprintf("expertparallel: counts for %d layers, table has %d", len(counts), len(t.Owners)))
	}
	for l := range counts {
		if len(counts[l]) != len(t.Owners[l]) {
			panic(fmt.Sprintf("expertparallel: layer %d: counts for %d experts, table has %d", l, len(counts[l]), len(t.Owners[l])))
		}
	}
}

// Imbalance is max/mean of one layer's per-rank load: 1 is perfect balance,
// G means one rank does all the work. The MoE block waits for its slowest
// rank, so this is roughly how much longer the block takes than it would
// balanced. It is 1 when load is empty or all zero.
func Imbalance(load []float64) float64 {
	most, sum := 0.0, 0.0
	for _, x := range load {
		most = max(most, x)
		sum += x
	}
	if sum <= 0 {
		return 1
	}
	return most / (sum / float64(len(load)))
}

// Imbalance is the token-weighted imbalance of counts under t over all
// layers, Σ_l max_r load / Σ_l mean_r load (RankLoad's loads): layers with
// more tokens weigh more, and a layer without tokens adds nothing. It is 1
// when there are no tokens. counts must have t's shape, as for RankLoad.
func (t *Table) Imbalance(counts [][]int64) float64 {
	maxSum, meanSum := 0.0, 0.0
	for _, load := range t.RankLoad(counts) {
		most, sum := 0.0, 0.0
		for _, x := range load {
			most = max(most, x)
			sum += x
		}
		maxSum += most
		meanSum += sum / float64(len(load))
	}
	if meanSum <= 0 {
		return 1
	}
	return maxSum / meanSum
}
