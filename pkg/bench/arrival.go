package bench

import (
	"math"
	"math/rand/v2"
	"time"
)

// Poisson gives the gaps between arrivals of a Poisson process: independent
// exponential inter-arrival times of mean 1/rate, reproducible for a seed.
// It is not safe for concurrent use; the one loop that schedules arrivals
// owns it.
type Poisson struct {
	rate float64
	rng  *rand.Rand
}

// NewPoisson makes a process of rate arrivals per second. A rate of +Inf
// gives gaps of 0 (everything at once); rate must be > 0.
func NewPoisson(rate float64, seed uint64) *Poisson {
	if !(rate > 0) {
		panic("bench: Poisson rate must be > 0")
	}
	return &Poisson{rate: rate, rng: rand.New(rand.NewPCG(seed, 0x9e3779b97f4a7c15))}
}

// Next returns the gap before the next arrival.
func (p *Poisson) Next() time.Duration {
	if math.IsInf(p.rate, 1) {
		return 0
	}
	s := p.rng.ExpFloat64() / p.rate
	return time.Duration(min(s*float64(time.Second), math.MaxInt64/2))
}
