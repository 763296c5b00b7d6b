package sampling

import (
	"fmt"
	"math"
)

// Params mirror the OpenAI / vLLM sampling fields.
type Params struct {
	Temperature       float32 // 0 = greedy (argmax); must be >= 0, finite and <= 100
	TopP              float32 // (0, 1]; 1 = off. Normalize turns the zero value into 1.
	TopK              int     // 0 or -1 = off; otherwise >= 1
	MinP              float32 // [0, 1]; 0 = off
	RepetitionPenalty float32 // > 0; 1 = off. Normalize turns the zero value into 1.
	PresencePenalty   float32 // [-2, 2]; 0 = off
	FrequencyPenalty  float32 // [-2, 2]; 0 = off
	Seed              uint64
	HasSeed           bool // false = New draws a random seed
}

// MaxTemperature is the largest accepted temperature.
const MaxTemperature = 100

// Normalize fills defaults: TopP 0 -> 1, RepetitionPenalty 0 -> 1, TopK -1 -> 0.
// It is idempotent.
func (p *Params) Normalize() {
	if p.TopP == 0 {
		p.TopP = 1
	}
	if p.RepetitionPenalty == 0 {
		p.RepetitionPenalty = 1
	}
	if p.TopK == -1 {
		p.TopK = 0
	}
}

func finite(v float32) bool {
	f := float64(v)
	return !math.IsNaN(f) && !math.IsInf(f, 0)
}

// Validate checks every field and returns the first problem found. The error
// message starts with the OpenAI field name (temperature, top_p, top_k, min_p,
// repetition_penalty, presence_penalty, frequency_penalty). NaN and ±Inf are
// rejected everywhere. Call it after Normalize.
func (p *Params) Validate() error {
	switch t := p.Temperature; {
	case !finite(t):
		return fmt.Errorf("temperature: must be finite, got %v", t)
	case t < 0:
		return fmt.Errorf("temperature: must be >= 0, got %v", t)
	case t > MaxTemperature:
		return fmt.Errorf("temperature: must be <= %v, got %v", MaxTemperature, t)
	}
	if v := p.TopP; !finite(v) || v <= 0 || v > 1 {
		return fmt.Errorf("top_p: %v is outside (0, 1]", v)
	}
	if k := p.TopK; k < -1 {
		return fmt.Errorf("top_k: must be -1, 0 or >= 1, got %d", k)
	}
	if v := p.MinP; !finite(v) || v < 0 || v > 1 {
		return fmt.Errorf("min_p: %v is outside [0, 1]", v)
	}
	if v := p.RepetitionPenalty; !finite(v) || v <= 0 {
		return fmt.Errorf("repetition_penalty: must be > 0 and finite, got %v", v)
	}
	if v := p.PresencePenalty; !finite(v) || v < -2 || v > 2 {
		return fmt.Errorf("presence_penalty: %v is outside [-2, 2]", v)
	}
	if v := p.FrequencyPenalty; !finite(v) || v < -2 || v > 2 {
		return fmt.Errorf("frequency_penalty: %v is outside [-2, 2]", v)
	}
	return nil
}

// Greedy reports Temperature == 0: Sample returns the argmax and draws no
// random number.
func (p *Params) Greedy() bool { return p.Temperature == 0 }

// Penalized reports whether any of the repetition, presence or frequency
// penalties is active. A zero RepetitionPenalty (not yet normalized) counts as
// off.
func (p *Params) Penalized() bool {
	return p.repetitionActive() || p.PresencePenalty != 0 || p.FrequencyPenalty != 0
}

func (p *Params) repetitionActive() bool {
	return p.RepetitionPenalty != 1 && p.RepetitionPenalty != 0
}

func (p *Params) topPActive() bool { return p.TopP > 0 && p.TopP < 1 }
