package expertparallel_test

import (
	"fmt"

	"github.com/qwenfleet/qwenfleet/pkg/expertparallel"
)

// A skewed workload on a stage of 4 ranks, 64 experts, 2 layers: expert i
// of layer 0 gets 1000/(i+1) tokens, layer 1 the same in reverse order, so
// under the contiguous layout rank 0 (layer 0) and rank 3 (layer 1) hold
// the hot experts. Rebalance with 16 slots per rank only moves experts;
// 17 slots give the four spare slots to the hottest experts (expert 0
// gets a replica on every rank), which here balances the ranks exactly.
func ExampleRebalance() {
	const layers, experts, ranks = 2, 64, 4
	stats := expertparallel.NewStats(layers, experts)
	window := make([][]int64, layers)
	for l := range window {
		window[l] = make([]int64, experts)
		for e := range window[l] {
			hot := e
			if l == 1 {
				hot = experts - 1 - e
			}
			window[l][e] = int64(1000 / (hot + 1))
		}
	}
	if err := stats.Add(window); err != nil {
		fmt.Println(err)
		return
	}
	counts := stats.Counts()

	table, _ := expertparallel.Contiguous(layers, experts, ranks)
	fmt.Printf("contiguous: imbalance %.3f, layer 0 rank loads %.0f\n",
		table.Imbalance(counts), table.RankLoad(counts)[0])
	for _, slots := range []int{16, 17} {
		next, err := expertparallel.Rebalance(counts, ranks, slots)
		if err != nil {
			fmt.Println(err)
			return
		}
		fmt.Printf("slots %d: imbalance %.3f, layer 0 rank loads %.0f, expert 0 on ranks %v\n",
			slots, next.Imbalance(counts), next.RankLoad(counts)[0], next.Owners[0][0])
	}
	// Output:
	// contiguous: imbalance 2.863, layer 0 rank loads [3375 671 393 277]
	// slots 16: imbalance 1.089, layer 0 rank loads [1284 1156 1138 1138], expert 0 on ranks [0]
	// slots 17: imbalance 1.000, layer 0 rank loads [1179 1179 1179 1179], expert 0 on ranks [0 1 2 3]
}
