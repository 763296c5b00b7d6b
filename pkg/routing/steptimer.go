package routing

import (
	"math"
	"slices"
	"time"
)

// StepTimeout is how an Engine bounds each executor call, from the
// replica's own recent steps, so that a hung worker is found in seconds
// while a legitimately slow replica (a big model, a long pipeline) is not
// cut off. The engine keeps the wall time and the token count (the
// prompt-chunk and decode tokens the step computed) of its last
// StepWindow successful steps; a step of T tokens then may take
//
//	max(Min, Factor × median(time) × max(1, T / median(tokens)))
//
// so a large prefill chunk after a decode-dominated history gets time in
// proportion to its tokens. With fewer than MinStepHistory successful
// steps in the window, a step may take max(Min, Initial). A step that
// runs out of time fails as any failed step does (its sequences go back
// to the queue; OnStepError sees context.DeadlineExceeded); failed steps
// are not recorded.
type StepTimeout struct {
	Min     time.Duration // the floor (0: 5 s)
	Factor  float64       // the multiple of the median step (0: 10)
	Initial time.Duration // before the history is long enough (0: 60 s)
}

// DefaultStepTimeout is what zero fields of a StepTimeout mean: Min 5 s,
// Factor 10, Initial 60 s.
func DefaultStepTimeout() StepTimeout {
	return StepTimeout{Min: 5 * time.Second, Factor: 10, Initial: 60 * time.Second}
}

const (
	// StepWindow is how many recent successful steps StepTimeout looks at.
	StepWindow = 32
	// MinStepHistory is how many it needs before it leaves Initial.
	MinStepHistory = 4
)

// stepTimer computes step timeouts from a window of recent steps. Its cfg
// is used as is (no defaults applied: Factor 0 makes every timeout
// max(Min, Initial) once there is history, i.e. Min). Not safe for
// concurrent use.
type stepTimer struct {
	cfg    StepTimeout
	took   [StepWindow]time.Duration
	tokens [StepWindow]int
	n      int // steps recorded so far (the window holds min(n, StepWindow))
}

// record adds a successful step of the given wall time and tokens,
// dropping the oldest beyond the window.
func (s *stepTimer) record(took time.Duration, tokens int) {
	i := s.n % StepWindow
	s.took[i], s.tokens[i] = took, tokens
	s.n++
}

// medians are those of the window's times and tokens; ok is false while
// the window has fewer than MinStepHistory steps.
func (s *stepTimer) medians() (took time.Duration, tokens float64, ok bool) {
	n := min(s.n, StepWindow)
	if n < MinStepHistory {
		return 0, 0, false
	}
	ds := slices.Clone(s.took[:n])
	ts := slices.Clone(s.tokens[:n])
	slices.Sort(ds)
	slices.Sort(ts)
	if n%2 == 1 {
		return ds[n/2], float64(ts[n/2]), true
	}
	return ds[n/2-1] + (ds[n/2]-ds[n/2-1])/2, float64(ts[n/2-1]+ts[n/2]) / 2, true
}

// timeout is how long a step of the given tokens may take.
func (s *stepTimer) timeout(tokens int) time.Duration {
	took, medTok, ok := s.medians()
	return s.bound(took, medTok, ok, float64(tokens))
}

// typical is the timeout of a step of the median token count.
func (s *stepTimer) typical() time.Duration {
	took, medTok, ok := s.medians()
	return s.bound(took, medTok, ok, medTok)
}

func (s *stepTimer) bound(took time.Duration, medTok float64, ok bool, tokens float64) time.Duration {
	if !ok {
		return max(s.cfg.Min, s.cfg.Initial)
	}
	scale := 1.0
	if medTok > 0 {
		scale = max(1, tokens/medTok)
	}
	d := s.cfg.Factor * float64(took) * scale
	if d >= math.MaxInt64 {
		return time.Duration(math.MaxInt64)
	}
	return max(s.cfg.Min, time.Duration(d))
}
