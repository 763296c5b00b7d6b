package routing

import (
	"testing"
	"time"
)

func TestStepTimer(t *testing.T) {
	type step struct {
		took   time.Duration
		tokens int
	}
	steady := func(n int, took time.Duration, tokens int) []step {
		out := make([]step, n)
		for i := range out {
			out[i] = step{took, tokens}
		}
		return out
	}
	def := DefaultStepTimeout()
	fixed := StepTimeout{Min: 30 * time.Millisecond, Initial: 30 * time.Millisecond} // as SetStepTimeout(30ms)
	cases := []struct {
		name    string
		cfg     StepTimeout
		history []step
		tokens  int
		want    time.Duration
		typical time.Duration
	}{
		{name: "no history: Initial", cfg: def, tokens: 100, want: 60 * time.Second, typical: 60 * time.Second},
		{name: "3 steps: still Initial", cfg: def, history: steady(3, time.Millisecond, 1), tokens: 1,
			want: 60 * time.Second, typical: 60 * time.Second},
		{name: "Initial below Min", cfg: StepTimeout{Min: 5 * time.Second, Factor: 10, Initial: time.Second},
			tokens: 1, want: 5 * time.Second, typical: 5 * time.Second},
		{name: "4 steps: Factor × median", cfg: def, history: steady(4, time.Second, 1), tokens: 1,
			want: 10 * time.Second, typical: 10 * time.Second},
		{name: "fast steps: Min", cfg: def, history: steady(8, 100*time.Millisecond, 1), tokens: 1,
			want: 5 * time.Second, typical: 5 * time.Second},
		{name: "prefill chunk after decodes scales with its tokens", cfg: def, history: steady(32, time.Second, 2),
			tokens: 512, want: 2560 * time.Second, typical: 10 * time.Second},
		{name: "a smaller step than the median gets the typical timeout", cfg: def, history: steady(32, time.Second, 64),
			tokens: 1, want: 10 * time.Second, typical: 10 * time.Second},
		{name: "median of an even window is the mean of the middle two", cfg: def,
			history: []step{{4 * time.Second, 1}, {time.Second, 1}, {3 * time.Second, 1}, {2 * time.Second, 1}},
			tokens:  1, want: 25 * time.Second, typical: 25 * time.Second},
		{name: "median, not mean: one slow step does not move it", cfg: def,
			history: append(steady(4, time.Second, 1), step{time.Hour, 1}), tokens: 1,
			want: 10 * time.Second, typical: 10 * time.Second},
		{name: "median tokens: mixed steps", cfg: def,
			history: []step{{time.Second, 1}, {time.Second, 1}, {time.Second, 1}, {2 * time.Second, 64}, {2 * time.Second, 64}},
			tokens:  64, want: 640 * time.Second, typical: 10 * time.Second},
		{name: "the window forgets steps older than the last 32", cfg: def,
			history: append(steady(32, 100*time.Second, 1), steady(32, time.Second, 1)...), tokens: 1,
			want: 10 * time.Second, typical: 10 * time.Second},
		{name: "Factor 0 (SetStepTimeout): fixed, before history", cfg: fixed, tokens: 1000,
			want: 30 * time.Millisecond, typical: 30 * time.Millisecond},
		{name: "Factor 0 (SetStepTimeout): fixed, after history", cfg: fixed, history: steady(10, time.Second, 1), tokens: 1000,
			want: 30 * time.Millisecond, typical: 30 * time.Millisecond},
		{name: "no overflow", cfg: StepTimeout{Min: time.Second, Factor: 1e9, Initial: time.Second},
			history: steady(4, time.Hour, 1), tokens: 1 << 30, want: time.Duration(1<<63 - 1), typical: time.Duration(1<<63 - 1)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := stepTimer{cfg: c.cfg}
			for _, h := range c.history {
				s.record(h.took, h.tokens)
			}
			if got := s.timeout(c.tokens); got != c.want {
				t.Errorf("timeout(%d) = %v, want %v", c.tokens, got, c.want)
			}
			if got := s.typical(); got != c.typical {
				t.Errorf("typical() = %v, want %v", got, c.typical)
			}
		})
	}
}
