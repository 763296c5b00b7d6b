package model_test

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/expertparallel"
	"github.com/qwenfleet/qwenfleet/pkg/kernels/cpu"
	"github.com/qwenfleet/qwenfleet/pkg/kvcache"
	"github.com/qwenfleet/qwenfleet/pkg/model"
	"github.com/qwenfleet/qwenfleet/pkg/safetensors"
)

// group is a model split tp × pp (or ep × pp, attention tp) in one
// process: stage s rank r is models[s][r], on its own backend and cache,
// talking through LocalComms (LocalStageComms).
type group struct {
	models  [][]*model.Model
	caches  [][]*kvcache.Storage
	comms   [][]model.Comm
	vocab   int
	experts model.ExpertMap // Batch.Experts of every step (nil: the shards')
}

// layout is a split of a model: ep > 1 splits each stage's experts over ep
// ranks, with attention over groups of tp.
type layout struct{ tp, ep, pp int }

func (l layout) String() string {
	if l.ep > 1 {
		return fmt.Sprintf("ep%d-tp%d-pp%d", l.ep, l.tp, l.pp)
	}
	return fmt.Sprintf("tp%d-pp%d", l.tp, l.pp)
}

// ranks is the number of ranks of a stage.
func (l layout) ranks() int { return max(l.tp, l.ep) }

func stageBounds(layers, pp int) [][2]int {
	var out [][2]int
	for s := 0; s < pp; s++ {
		out = append(out, [2]int{s * layers / pp, (s + 1) * layers / pp})
	}
	return out
}

func newGroup(t *testing.T, c *refCase, tp, pp, blocks int) (*group, int64) {
	t.Helper()
	return newLayout(t, c, layout{tp: tp, ep: 1, pp: pp}, blocks, nil)
}

// newLayout builds group l of case c; em places the experts (nil: the
// default).
func newLayout(t *testing.T, c *refCase, l layout, blocks int, em model.ExpertMap) (*group, int64) {
	t.Helper()
	tp, pp := l.tp, l.pp
	cfg, err := model.LoadConfig(c.dir + "/config.json")
	if err != nil {
		t.Fatal(err)
	}
	g := &group{vocab: cfg.VocabSize}
	var read int64
	for _, lr := range stageBounds(cfg.NumHiddenLayers, pp) {
		var ms []*model.Model
		var cs []*kvcache.Storage
		for r := 0; r < l.ranks(); r++ {
			b, err := cpu.New(cpu.Config{Threads: 1, BatchInvariant: true})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(b.Close)
			ck, err := safetensors.Open(c.dir, safetensors.Options{})
			if err != nil {
				t.Fatal(err)
			}
			sh := model.Shard{LayersBegin: lr[0], LayersEnd: lr[1], TPRank: r, TPSize: tp}
			if l.ep > 1 {
				sh.TPRank, sh.EPRank, sh.EPSize, sh.Experts = r%tp, r, l.ep, em
			}
			m, err := model.NewShard(cfg, b, model.Checkpoint{Checkpoint: ck}, sh)
			if err != nil {
				t.Fatalf("shard %+v: %v", sh, err)
			}
			// Each shard reads exactly the bytes of its own tensors.
			if ck.BytesRead() != m.WeightBytes() {
				t.Errorf("shard %+v read %d bytes for %d bytes of weights", sh, ck.BytesRead(), m.WeightBytes())
			}
			read += ck.BytesRead()
			ck.Close()
			ms = append(ms, m)
			cs = append(cs, kvcache.NewStorage(b, m.NumLayers(), blocks, 16, m.KVDim()))
		}
		g.models = append(g.models, ms)
		g.caches = append(g.caches, cs)
		comms := model.LocalComms(tp)
		if l.ep > 1 {
			comms = comms[:0]
			for r, x := range model.LocalExchangers(l.ep, tp) {
				comms = append(comms, &expertparallel.Stage{Exchanger: x, Rank: r, Size: l.ep})
			}
		}
		g.comms = append(g.comms, comms)
	}
	return g, read
}

// forward runs a batch through every stage and returns each sequence's
// logits over the whole vocabulary (the slices of the last stage's ranks
// put together).
func (g *group) forward(seqs []model.Seq) ([][]float32, error) {
	var hidden []float32
	for s, ms := range g.models {
		outs := make([]*model.Output, len(ms))
		errs := make([]error, len(ms))
		var wg sync.WaitGroup
		for r, m := range ms {
			wg.Go(func() {
				outs[r], errs[r] = m.Forward(&model.Batch{Seqs: seqs, Hidden: hidden, Comm: g.comms[s][r], Experts: g.experts}, g.caches[s][r])
			})
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				return nil, err
			}
		}
		if s < len(g.models)-1 {
			for r := 1; r < len(outs); r++ {
				if !slices.Equal(outs[r].Hidden, outs[0].Hidden) {
					return nil, fmt.Errorf("stage %d: ranks 0 and %d hold different hidden states", s, r)
				}
			}
			hidden = outs[0].Hidden
			continue
		}
		res := make([][]float32, len(seqs))
		for i := range seqs {
			rows := len(outs[0].Logits[i]) / (outs[0].VocabEnd - outs[0].VocabBegin)
			full := make([]float32, rows*g.vocab)
			for _, o := range outs {
				w := o.VocabEnd - o.VocabBegin
				for j := 0; j < rows; j++ {
					copy(full[j*g.vocab+o.VocabBegin:j*g.vocab+o.VocabEnd], o.Logits[i][j*w:(j+1)*w])
				}
			}
			res[i] = full
		}
		return res, nil
	}
	return nil, nil
}

// TestShardedLayouts splits every reference case over each TP × PP layout
// its head counts allow and checks the prompt logits against the
// HuggingFace reference, greedy decoding (two sequences batched, so the
// decode steps are batched too) against the reference ids, and that the
// group together reads each checkpoint byte at most the times it is
// replicated.
func TestShardedLayouts(t *testing.T) {
	for _, c := range refCases(t) {
		cfg, err := model.LoadConfig(c.dir + "/config.json")
		if err != nil {
			t.Fatal(err)
		}
		for _, tp := range []int{1, 2, 4} {
			for _, pp := range []int{1, 2, 3} {
				if tp*pp == 1 || pp > cfg.NumHiddenLayers || model.CheckTP(cfg, tp) != nil {
					continue
				}
				t.Run(fmt.Sprintf("%s/tp%d-pp%d", c.name, tp, pp), func(t *testing.T) {
					g, _ := newGroup(t, c, tp, pp, 64)
					checkGroup(t, c, g, nil)
				})
			}
		}
	}
}

// checkGroup checks g's prompt logits against the reference, a chunked
// prompt, and greedy decoding of two batched sequences against the
// reference ids. between, when set, runs before each decode step.
func checkGroup(t *testing.T, c *refCase, g *group, between func(step int)) {
	t.Helper()
	prompt, want := c.json.PromptIDs, c.json.GreedyIDs
	blocks := func(base int32) []int32 {
		var b []int32
		for i := int32(0); i < 16; i++ {
			b = append(b, base+i)
		}
		return b
	}
	b1, b2 := blocks(0), blocks(16)
	out, err := g.forward([]model.Seq{
		{Tokens: prompt, Blocks: b1, AllLogits: true},
		{Tokens: prompt[:len(prompt)-1], Blocks: b2},
	})
	if err != nil {
		t.Fatal(err)
	}
	if d := maxDiff(out[0], c.tensor(t, "logits")); d > c.tol() {
		t.Errorf("prompt logits differ from the reference by %g (tolerance %g)", d, c.tol())
	}
	// Sequence 2 catches up by one token, then both decode together.
	out2, err := g.forward([]model.Seq{{Tokens: prompt[len(prompt)-1:], Pos: len(prompt) - 1, Blocks: b2}})
	if err != nil {
		t.Fatal(err)
	}
	last := out[0][(len(prompt)-1)*g.vocab:]
	if d := maxDiff(last, out2[0]); d > c.tol() {
		t.Errorf("chunked prompt's last logits differ by %g", d)
	}
	var got1, got2 []int32
	n1, n2 := int32(model.Argmax(last)), int32(model.Argmax(out2[0]))
	for step := 0; len(got1) < len(want); step++ {
		got1, got2 = append(got1, n1), append(got2, n2)
		pos := len(prompt) + step
		if between != nil {
			between(step)
		}
		o, err := g.forward([]model.Seq{{Tokens: []int32{n1}, Pos: pos, Blocks: b1}, {Tokens: []int32{n2}, Pos: pos, Blocks: b2}})
		if err != nil {
			t.Fatal(err)
		}
		n1, n2 = int32(model.Argmax(o[0])), int32(model.Argmax(o[1]))
	}
	if !slices.Equal(got1, want) || !slices.Equal(got2, want) {
		t.Fatalf("greedy ids %v and %v, want %v", got1, got2, want)
	}
}

// TestShardReadsOnlyItsSlice counts the checkpoint bytes a TP=2 × PP=2
// group reads: each shard reads exactly its own weights (checked in
// newGroup), and all four together read the checkpoint once plus what is
// replicated (norms, KV heads when TP exceeds them, and the tied
// embedding held again as the last stage's head).
func TestShardReadsOnlyItsSlice(t *testing.T) {
	for _, c := range refCases(t) {
		cfg, err := model.LoadConfig(c.dir + "/config.json")
		if err != nil {
			t.Fatal(err)
		}
		if model.CheckTP(cfg, 2) != nil || c.json.RouterTopK != nil {
			continue
		}
		t.Run(c.name, func(t *testing.T) {
			_, read := newGroup(t, c, 2, 2, 4)
			ck, err := safetensors.Open(c.dir, safetensors.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer ck.Close()
			var total, norms int64 // norms: what both ranks of a stage hold
			for _, n := range ck.Names() {
				info, _ := ck.Info(n)
				total += info.Size
				isKV := strings.Contains(n, ".k_proj.") || strings.Contains(n, ".v_proj.")
				switch {
				case len(info.Shape) == 1 && !strings.HasSuffix(n, "bias"):
					norms += info.Size
				case isKV && cfg.NumKeyValueHeads < 2: // one KV head, replicated on both ranks
					norms += info.Size
				}
			}
			want := total + norms // norm vectors are held by both ranks
			if cfg.TieWordEmbeddings {
				info, _ := ck.Info(model.EmbedName)
				want += info.Size
			}
			if read != want {
				t.Fatalf("the group read %d bytes; the checkpoint holds %d (+%d replicated)", read, total, want-total)
			}
		})
	}
}
