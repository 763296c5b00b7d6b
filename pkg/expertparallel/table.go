package expertparallel

import (
	"errors"
	"fmt"
	"slices"

	"github.com/qwenfleet/qwenfleet/pkg/model"
)

var (
	// ErrInvalidTable is wrapped by every error about a malformed Table
	// (Validate, FromFlat): the message names the layer and expert.
	ErrInvalidTable = errors.New("expertparallel: invalid table")
	// ErrInvalidArgument is wrapped by errors about arguments to
	// Contiguous, Rebalance and Stats.Add (sizes, shapes, negative counts).
	ErrInvalidArgument = errors.New("expertparallel: invalid argument")
)

// Table places the routed experts of one expert-parallel stage on its
// ranks: for each decoder layer (the model's global layer index 0…L-1) and
// routed expert, the ranks that hold its weights. It satisfies pkg/model's
// ExpertMap (Holds, Owner).
//
// A Table is a value: nothing in this package changes one after it is
// returned, and its methods may be called concurrently. A caller that
// edits Owners must call Validate again.
type Table struct {
	// Ranks is G, the number of ranks in the stage.
	Ranks int
	// Owners[layer][expert] are the ranks holding the expert: ascending,
	// distinct, in [0, Ranks), at least one. Two or more are replicas.
	Owners [][][]int
}

var _ model.ExpertMap = (*Table)(nil)

// Contiguous is the default layout as a Table: model.Contiguous, the
// placement a shard uses when given none. In every layer rank r holds
// experts [r·E/G, (r+1)·E/G) (integer division), one copy each. When G
// divides E every rank holds E/G experts; otherwise the blocks differ by
// at most one (E=10, G=4: 2, 3, 2, 3).
func Contiguous(layers, experts, ranks int) (*Table, error) {
	switch {
	case ranks < 1:
		return nil, fmt.Errorf("%w: %d ranks; need at least 1", ErrInvalidArgument, ranks)
	case layers < 1:
		return nil, fmt.Errorf("%w: %d layers; need at least 1", ErrInvalidArgument, layers)
	case experts < ranks:
		return nil, fmt.Errorf("%w: %d experts over %d ranks leaves a rank without one", ErrInvalidArgument, experts, ranks)
	}
	t := &Table{Ranks: ranks, Owners: make([][][]int, layers)}
	for l := range t.Owners {
		t.Owners[l] = contiguousLayer(experts, ranks)
	}
	return t, nil
}

// contiguousLayer is one layer of Contiguous (experts >= ranks >= 1).
func contiguousLayer(experts, ranks int) [][]int {
	c := model.Contiguous{Experts: experts, Ranks: ranks}
	owners := make([][]int, experts)
	for e := range owners {
		owners[e] = []int{c.Owner(0, e, 0)}
	}
	return owners
}

// Validate checks that t places experts experts in each of layers layers:
// the shape, every owner list ascending, distinct and in [0, Ranks), and
// every rank holding at least one expert in every layer (a rank with none
// would idle in the MoE block). Errors wrap ErrInvalidTable.
func (t *Table) Validate(layers, experts int) error {
	if t == nil {
		return fmt.Errorf("%w: nil", ErrInvalidTable)
	}
	if t.Ranks < 1 {
		return fmt.Errorf("%w: %d ranks; need at least 1", ErrInvalidTable, t.Ranks)
	}
	if len(t.Owners) != layers {
		return fmt.Errorf("%w: %d layers, want %d", ErrInvalidTable, len(t.Owners), layers)
	}
	held := make([]int, t.Ranks)
	for l, layer := range t.Owners {
		if len(layer) != experts {
			return fmt.Errorf("%w: layer %d has %d experts, want %d", ErrInvalidTable, l, len(layer), experts)
		}
		clear(held)
		for e, owners := range layer {
			if len(owners) == 0 {
				return fmt.Errorf("%w: layer %d expert %d has no owner", ErrInvalidTable, l, e)
			}
			for i, r := range owners {
				if r < 0 || r >= t.Ranks {
					return fmt.Errorf("%w: layer %d expert %d: owner rank %d outside [0, %d)", ErrInvalidTable, l, e, r, t.Ranks)
				}
				if i > 0 && r <= owners[i-1] {
					return fmt.Errorf("%w: layer %d expert %d: owners %v are not ascending and distinct", ErrInvalidTable, l, e, owners)
				}
				held[r]++
			}
		}
		for r, n := range held {
			if n == 0 {
				return fmt.Errorf("%w: layer %d: rank %d holds no expert", ErrInvalidTable, l, r)
			}
		}
	}
	return nil
}

// Owner is the rank that computes token row row's use of expert in layer:
// Owners[layer][expert][row % replicas], so the replicas of an expert split
// its tokens round-robin by row. Every rank evaluates the same function of
// the same rows, so all agree without talking. row must not be negative.
func (t *Table) Owner(layer, expert, row int) int {
	owners := t.Owners[layer][expert]
	return owners[row%len(owners)]
}

// Holds says whether rank holds expert's weights in layer.
func (t *Table) Holds(layer, expert, rank int) bool {
	_, found := slices.BinarySearch(t.Owners[layer][expert], rank)
	return found
}

// Experts is the experts rank holds in layer, ascending (a new slice).
func (t *Table) Experts(layer, rank int) []int {
	var out []int
	for e := range t.Owners[layer] {
		if t.Holds(layer, e, rank) {
			out = append(out, e)
		}
	}
	return out
}

// Slots is the most experts one rank holds in one layer, over all layers
// and ranks: the expert weights a rank must have room for. Contiguous(L,
// E, G).Slots() is ⌈E/G⌉; a Table from Rebalance has the slots it was given
// unless no layer had tokens.
func (t *Table) Slots() int {
	most := 0
	held := make([]int, t.Ranks)
	for _, layer := range t.Owners {
		clear(held)
		for _, owners := range layer {
			for _, r := range owners {
				held[r]++
			}
		}
		for _, n := range held {
			most = max(most, n)
		}
	}
	return most
}

// Equal says whether t and u place every expert on the same ranks. Two nil
// tables are equal.
func (t *Table) Equal(u *Table) bool {
	if t == nil || u == nil {
		return t == u
	}
	if t.Ranks != u.Ranks || len(t.Owners) != len(u.Owners) {
		return false
	}
	for l := range t.Owners {
		if !slices.EqualFunc(t.Owners[l], u.Owners[l], slices.Equal) {
			return false
		}
	}
	return true
}
