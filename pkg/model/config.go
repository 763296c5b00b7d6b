package model

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"slices"
)

// Config is a Qwen2 or Qwen2-MoE config.json. Field names follow the
// HuggingFace keys; see ../shared/docs/qwen2.md section 1 for every model's
// values.
type Config struct {
	Architectures []string `json:"architectures,omitempty"`
	ModelType     string   `json:"model_type"` // "qwen2" or "qwen2_moe"

	HiddenSize        int `json:"hidden_size"`         // H
	IntermediateSize  int `json:"intermediate_size"`   // I: dense MLP width (unused when every layer is MoE)
	NumHiddenLayers   int `json:"num_hidden_layers"`   // L
	NumAttentionHeads int `json:"num_attention_heads"` // query heads
	NumKeyValueHeads  int `json:"num_key_value_heads"` // KV heads (GQA); defaults to the query heads
	HeadDim           int `json:"head_dim,omitempty"`  // absent in Qwen2 configs: hidden_size / heads
	VocabSize         int `json:"vocab_size"`          // embedding rows (151936 or 152064)

	MaxPositionEmbeddings int          `json:"max_position_embeddings"`
	RopeTheta             float64      `json:"rope_theta"`
	RopeScaling           *RopeScaling `json:"rope_scaling"`
	RMSNormEps            float64      `json:"rms_norm_eps"`
	HiddenAct             string       `json:"hidden_act"`
	TieWordEmbeddings     bool         `json:"tie_word_embeddings"`
	TorchDtype            string       `json:"torch_dtype,omitempty"`

	// DualChunkAttention switches on Dual Chunk Attention (qwen2.md 2.8);
	// nil (the key absent or null) leaves it off.
	DualChunkAttention *DualChunkAttention `json:"dual_chunk_attention_config,omitempty"`

	BosTokenID  *int   `json:"bos_token_id,omitempty"`
	EosTokenIDs IntSet `json:"eos_token_id,omitempty"` // a number or a list in config.json

	AttentionDropout    float64 `json:"attention_dropout"`
	InitializerRange    float64 `json:"initializer_range,omitempty"`
	UseSlidingWindow    bool    `json:"use_sliding_window"`
	SlidingWindow       *int    `json:"sliding_window,omitempty"`
	MaxWindowLayers     int     `json:"max_window_layers,omitempty"`
	UseCache            *bool   `json:"use_cache,omitempty"`
	TransformersVersion string  `json:"transformers_version,omitempty"`

	// Qwen2-MoE keys.
	NumExperts                   int     `json:"num_experts,omitempty"`
	NumExpertsPerTok             int     `json:"num_experts_per_tok,omitempty"`
	MoeIntermediateSize          int     `json:"moe_intermediate_size,omitempty"`
	SharedExpertIntermediateSize int     `json:"shared_expert_intermediate_size,omitempty"`
	NormTopkProb                 bool    `json:"norm_topk_prob"`
	DecoderSparseStep            int     `json:"decoder_sparse_step,omitempty"`
	MlpOnlyLayers                []int   `json:"mlp_only_layers,omitempty"`
	RouterAuxLossCoef            float64 `json:"router_aux_loss_coef,omitempty"`
	OutputRouterLogits           bool    `json:"output_router_logits,omitempty"`
}

// RopeScaling is the rope_scaling object. Only YaRN is used by Qwen2
// ("type" or "rope_type": "yarn"); "default" or a null object means none.
type RopeScaling struct {
	Type                          string   `json:"type,omitempty"`
	RopeType                      string   `json:"rope_type,omitempty"`
	Factor                        float64  `json:"factor"`
	OriginalMaxPositionEmbeddings int      `json:"original_max_position_embeddings,omitempty"`
	BetaFast                      *float64 `json:"beta_fast,omitempty"`
	BetaSlow                      *float64 `json:"beta_slow,omitempty"`
	AttentionFactor               *float64 `json:"attention_factor,omitempty"`
}

// DualChunkAttention is the dual_chunk_attention_config object (vLLM's
// keys, as Qwen2.5-*-1M ship them). ParseConfig fills an absent key with
// vLLM's default: chunk_size 8192, local_size 1024,
// original_max_position_embeddings 0 (no length temperature). The sparse
// attention keys (sparse_attention_config, ...) are ignored: attention is
// always dense.
type DualChunkAttention struct {
	ChunkSize int `json:"chunk_size"` // C
	LocalSize int `json:"local_size"` // Lc; chunks are c = C − Lc positions long
	// OriginalMaxPositionEmbeddings > 0 switches on the length temperature
	// τ(n) = max(1, 0.1·ln(n/orig) + 1) (kernels.DCATemperature).
	OriginalMaxPositionEmbeddings int `json:"original_max_position_embeddings"`
}

// ChunkLen is the chunk length c = chunk_size − local_size.
func (d *DualChunkAttention) ChunkLen() int { return d.ChunkSize - d.LocalSize }

// Positions returns the RoPE positions DCA gives the token at absolute
// position p (qwen2.md 2.8): key (and intra query) p mod c, successive
// query min(p mod c + c, C), inter query min(2c − 1, C).
func (d *DualChunkAttention) Positions(p int) (key, succ, inter int) {
	c := d.ChunkLen()
	key = p % c
	return key, min(key+c, d.ChunkSize), min(2*c-1, d.ChunkSize)
}

// Kind is the scaling type, from "rope_type" or the older "type".
func (r *RopeScaling) Kind() string {
	if r == nil {
		return "default"
	}
	if r.RopeType != "" {
		return r.RopeType
	}
	if r.Type != "" {
		return r.Type
	}
	return "default"
}

// IntSet is a JSON number or list of numbers (eos_token_id may be either).
type IntSet []int

// UnmarshalJSON accepts 5, [5, 6] and null.
func (s *IntSet) UnmarshalJSON(b []byte) error {
	b = bytes.TrimSpace(b)
	if string(b) == "null" {
		*s = nil
		return nil
	}
	if len(b) > 0 && b[0] == '[' {
		var v []int
		if err := json.Unmarshal(b, &v); err != nil {
			return err
		}
		*s = v
		return nil
	}
	var v int
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	*s = IntSet{v}
	return nil
}

// MarshalJSON writes a single id as a number, like HF.
func (s IntSet) MarshalJSON() ([]byte, error) {
	if len(s) == 1 {
		return json.Marshal(s[0])
	}
	return json.Marshal([]int(s))
}

// LoadConfig reads and validates a config.json.
func LoadConfig(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	c, err := ParseConfig(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// ParseConfig decodes and validates config.json bytes.
func ParseConfig(data []byte) (*Config, error) {
	c := &Config{}
	if err := json.Unmarshal(data, c); err != nil {
		var te *json.UnmarshalTypeError
		if asType(err, &te) {
			return nil, fmt.Errorf("config: key %q: want %s, got JSON %s", te.Field, te.Type, te.Value)
		}
		return nil, fmt.Errorf("config: %w", err)
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(data, &raw); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	c.applyDefaults(raw)
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

func asType(err error, target **json.UnmarshalTypeError) bool {
	te, ok := err.(*json.UnmarshalTypeError)
	if ok {
		*target = te
	}
	return ok
}

// applyDefaults fills keys that HF's Qwen2Config defaults when absent.
func (c *Config) applyDefaults(raw map[string]json.RawMessage) {
	if _, ok := raw["num_key_value_heads"]; !ok {
		c.NumKeyValueHeads = c.NumAttentionHeads
	}
	if _, ok := raw["rope_theta"]; !ok {
		c.RopeTheta = 10000
	}
	if _, ok := raw["rms_norm_eps"]; !ok {
		c.RMSNormEps = 1e-6
	}
	if _, ok := raw["hidden_act"]; !ok {
		c.HiddenAct = "silu"
	}
	if _, ok := raw["max_position_embeddings"]; !ok {
		c.MaxPositionEmbeddings = 32768
	}
	if c.ModelType == "qwen2_moe" {
		if _, ok := raw["decoder_sparse_step"]; !ok {
			c.DecoderSparseStep = 1
		}
	}
	if d := c.DualChunkAttention; d != nil {
		var keys map[string]json.RawMessage
		if json.Unmarshal(raw["dual_chunk_attention_config"], &keys) == nil {
			if _, ok := keys["chunk_size"]; !ok {
				d.ChunkSize = 8192
			}
			if _, ok := keys["local_size"]; !ok {
				d.LocalSize = 1024
			}
		}
	}
}

// Validate checks the config; errors name the offending key.
func (c *Config) Validate() error {
	bad := func(key string, format string, args ...any) error {
		return fmt.Errorf("config: key %q: %s", key, fmt.Sprintf(format, args...))
	}
	switch c.ModelType {
	case "qwen2", "qwen2_moe":
	case "":
		return bad("model_type", "missing (want qwen2 or qwen2_moe)")
	default:
		return bad("model_type", "%q is not supported (want qwen2 or qwen2_moe)", c.ModelType)
	}
	// Sizes must be positive and below generous limits (far above any
	// Qwen2 model), so a hostile config cannot make the loader loop or
	// allocate without end.
	positive := []struct {
		key   string
		v     int
		limit int
	}{
		{"hidden_size", c.HiddenSize, 1 << 17},
		{"num_hidden_layers", c.NumHiddenLayers, 1 << 12},
		{"num_attention_heads", c.NumAttentionHeads, 1 << 12},
		{"num_key_value_heads", c.NumKeyValueHeads, 1 << 12},
		{"vocab_size", c.VocabSize, 1 << 22},
		{"max_position_embeddings", c.MaxPositionEmbeddings, 1 << 26},
	}
	for _, p := range positive {
		if p.v <= 0 || p.v > p.limit {
			return bad(p.key, "must be in [1, %d], got %d", p.limit, p.v)
		}
	}
	for _, p := range []struct {
		key string
		v   int
	}{
		{"intermediate_size", c.IntermediateSize}, {"head_dim", c.HeadDim},
		{"moe_intermediate_size", c.MoeIntermediateSize}, {"shared_expert_intermediate_size", c.SharedExpertIntermediateSize},
	} {
		if p.v > 1<<20 {
			return bad(p.key, "%d is beyond the limit of %d", p.v, 1<<20)
		}
	}
	if c.NumExperts > 1<<12 {
		return bad("num_experts", "%d is beyond the limit of %d", c.NumExperts, 1<<12)
	}
	if n := c.NumHiddenLayers * (13 + 3*max(c.NumExperts, 0)); n > 1<<20 {
		return bad("num_hidden_layers", "%d layers of %d experts make %d tensors, beyond the limit of %d", c.NumHiddenLayers, c.NumExperts, n, 1<<20)
	}
	if c.NumAttentionHeads%c.NumKeyValueHeads != 0 {
		return bad("num_key_value_heads", "%d does not divide num_attention_heads %d", c.NumKeyValueHeads, c.NumAttentionHeads)
	}
	if c.HeadDim == 0 {
		if c.HiddenSize%c.NumAttentionHeads != 0 {
			return bad("num_attention_heads", "%d does not divide hidden_size %d", c.NumAttentionHeads, c.HiddenSize)
		}
	} else if c.HeadDim < 0 {
		return bad("head_dim", "must be > 0, got %d", c.HeadDim)
	}
	if c.headDim()%2 != 0 {
		return bad("hidden_size", "head dim %d is odd; rotary embedding needs it even", c.headDim())
	}
	if !(c.RopeTheta > 0) || math.IsInf(c.RopeTheta, 0) {
		return bad("rope_theta", "must be a positive number, got %v", c.RopeTheta)
	}
	if !(c.RMSNormEps > 0) || c.RMSNormEps > 1 {
		return bad("rms_norm_eps", "must be in (0, 1], got %v", c.RMSNormEps)
	}
	if c.HiddenAct != "silu" {
		return bad("hidden_act", "%q is not supported (Qwen2 uses silu)", c.HiddenAct)
	}
	if c.UseSlidingWindow {
		return bad("use_sliding_window", "true is not supported (every released Qwen2 config has false)")
	}
	if c.AttentionDropout < 0 || c.AttentionDropout >= 1 {
		return bad("attention_dropout", "must be in [0, 1), got %v", c.AttentionDropout)
	}
	if c.BosTokenID != nil && (*c.BosTokenID < 0 || *c.BosTokenID >= c.VocabSize) {
		return bad("bos_token_id", "%d is outside the vocabulary [0, %d)", *c.BosTokenID, c.VocabSize)
	}
	for _, id := range c.EosTokenIDs {
		if id < 0 || id >= c.VocabSize {
			return bad("eos_token_id", "%d is outside the vocabulary [0, %d)", id, c.VocabSize)
		}
	}
	if err := c.validateRope(); err != nil {
		return err
	}
	if err := c.validateDCA(); err != nil {
		return err
	}
	if c.ModelType == "qwen2_moe" {
		if err := c.validateMoE(); err != nil {
			return err
		}
	}
	if c.IntermediateSize <= 0 {
		for l := 0; l < c.NumHiddenLayers; l++ {
			if !c.IsMoELayer(l) {
				return bad("intermediate_size", "must be > 0 for dense layer %d, got %d", l, c.IntermediateSize)
			}
		}
	}
	if c.MaxContext() <= 0 || c.MaxContext() > 1<<26 {
		return bad("rope_scaling", "the context it gives, %d tokens, is outside [1, %d]", c.MaxContext(), 1<<26)
	}
	return nil
}

func (c *Config) validateRope() error {
	r := c.RopeScaling
	switch r.Kind() {
	case "default":
		return nil
	case "yarn":
	default:
		return fmt.Errorf("config: key %q: type %q is not supported (yarn or none)", "rope_scaling", r.Kind())
	}
	if !(r.Factor > 0) || math.IsInf(r.Factor, 0) {
		return fmt.Errorf("config: key %q: must be a positive number, got %v", "rope_scaling.factor", r.Factor)
	}
	if r.OriginalMaxPositionEmbeddings < 0 {
		return fmt.Errorf("config: key %q: must be > 0, got %d", "rope_scaling.original_max_position_embeddings", r.OriginalMaxPositionEmbeddings)
	}
	if r.Factor > 1<<16 {
		return fmt.Errorf("config: key %q: %v is beyond the limit of %d", "rope_scaling.factor", r.Factor, 1<<16)
	}
	fast, slow := 32.0, 1.0
	if r.BetaFast != nil {
		fast = *r.BetaFast
	}
	if r.BetaSlow != nil {
		slow = *r.BetaSlow
	}
	if !(fast > slow && slow > 0) || math.IsInf(fast, 0) {
		return fmt.Errorf("config: key %q: need beta_fast > beta_slow > 0, got %v and %v", "rope_scaling.beta_fast", fast, slow)
	}
	if a := r.AttentionFactor; a != nil && (!(*a > 0) || math.IsInf(*a, 0)) {
		return fmt.Errorf("config: key %q: must be a positive number, got %v", "rope_scaling.attention_factor", *a)
	}
	return nil
}

func (c *Config) validateDCA() error {
	d := c.DualChunkAttention
	if d == nil {
		return nil
	}
	bad := func(key string, format string, args ...any) error {
		return fmt.Errorf("config: key %q: %s", "dual_chunk_attention_config."+key, fmt.Sprintf(format, args...))
	}
	const limit = 1 << 26
	if d.LocalSize <= 0 || d.LocalSize > limit {
		return bad("local_size", "must be in [1, %d], got %d", limit, d.LocalSize)
	}
	if d.ChunkSize <= d.LocalSize || d.ChunkSize > limit {
		return bad("chunk_size", "must be > local_size (%d) and at most %d, got %d", d.LocalSize, limit, d.ChunkSize)
	}
	if o := d.OriginalMaxPositionEmbeddings; o < 0 || o > limit {
		return bad("original_max_position_embeddings", "must be in [0, %d], got %d", limit, o)
	}
	return nil
}

func (c *Config) validateMoE() error {
	bad := func(key string, format string, args ...any) error {
		return fmt.Errorf("config: key %q: %s", key, fmt.Sprintf(format, args...))
	}
	if c.NumExperts < 0 {
		return bad("num_experts", "must be >= 0, got %d", c.NumExperts)
	}
	if c.DecoderSparseStep <= 0 {
		return bad("decoder_sparse_step", "must be > 0, got %d", c.DecoderSparseStep)
	}
	for _, l := range c.MlpOnlyLayers {
		if l < 0 || l >= c.NumHiddenLayers {
			return bad("mlp_only_layers", "layer %d outside [0, %d)", l, c.NumHiddenLayers)
		}
	}
	if c.NumExperts == 0 {
		return nil
	}
	if c.NumExpertsPerTok <= 0 || c.NumExpertsPerTok > c.NumExperts {
		return bad("num_experts_per_tok", "must be in [1, num_experts=%d], got %d", c.NumExperts, c.NumExpertsPerTok)
	}
	if c.MoeIntermediateSize <= 0 {
		return bad("moe_intermediate_size", "must be > 0, got %d", c.MoeIntermediateSize)
	}
	if c.SharedExpertIntermediateSize < 0 {
		return bad("shared_expert_intermediate_size", "must be >= 0, got %d", c.SharedExpertIntermediateSize)
	}
	return nil
}

// headDim is head_dim, or hidden_size / num_attention_heads when absent.
func (c *Config) headDim() int {
	if c.HeadDim > 0 {
		return c.HeadDim
	}
	return c.HiddenSize / c.NumAttentionHeads
}

// HeadDimension is the size of one attention head.
func (c *Config) HeadDimension() int { return c.headDim() }

// IsMoE reports whether the model has any MoE layer.
func (c *Config) IsMoE() bool { return c.ModelType == "qwen2_moe" && c.NumExperts > 0 }

// IsMoELayer reports whether layer l uses the MoE block (HF's rule: not in
// mlp_only_layers, num_experts > 0, and (l+1) % decoder_sparse_step == 0).
func (c *Config) IsMoELayer(l int) bool {
	return c.IsMoE() && !slices.Contains(c.MlpOnlyLayers, l) && (l+1)%c.DecoderSparseStep == 0
}

// MaxContext is the longest sequence (prompt + generated) the model serves:
// original_max_position_embeddings × factor with YaRN (falling back to
// max_position_embeddings when the original is absent), otherwise
// max_position_embeddings. Dual Chunk Attention does not change it: it
// changes the positions attention sees, not how many a sequence may have.
func (c *Config) MaxContext() int {
	if c.RopeScaling.Kind() == "yarn" {
		l0 := c.RopeScaling.OriginalMaxPositionEmbeddings
		if l0 == 0 {
			l0 = c.MaxPositionEmbeddings
		}
		return int(min(float64(l0)*c.RopeScaling.Factor, 1<<40))
	}
	return c.MaxPositionEmbeddings
}

// Rope computes the rotary frequencies and attention factor: plain
// θ^(-2j/d), or YaRN as vLLM implements it (qwen2.md section 2.7).
func (c *Config) Rope() (invFreq []float32, scale float32) {
	d := c.headDim()
	base := c.RopeTheta
	theta := make([]float64, d/2)
	for j := range theta {
		theta[j] = 1 / math.Pow(base, float64(2*j)/float64(d))
	}
	invFreq = make([]float32, d/2)
	r := c.RopeScaling
	if r.Kind() != "yarn" {
		for j, t := range theta {
			invFreq[j] = float32(t)
		}
		return invFreq, 1
	}
	s := r.Factor
	l0 := float64(r.OriginalMaxPositionEmbeddings)
	if l0 == 0 {
		l0 = float64(c.MaxPositionEmbeddings)
	}
	betaFast, betaSlow := 32.0, 1.0
	if r.BetaFast != nil {
		betaFast = *r.BetaFast
	}
	if r.BetaSlow != nil {
		betaSlow = *r.BetaSlow
	}
	corr := func(rot float64) float64 {
		return float64(d) * math.Log(l0/(rot*2*math.Pi)) / (2 * math.Log(base))
	}
	low := math.Max(math.Floor(corr(betaFast)), 0)
	high := math.Min(math.Ceil(corr(betaSlow)), float64(d-1))
	if low == high {
		high += 0.001
	}
	for j, t := range theta {
		ramp := math.Min(math.Max((float64(j)-low)/(high-low), 0), 1)
		ext := 1 - ramp
		invFreq[j] = float32(t/s*(1-ext) + t*ext)
	}
	mscale := 1.0
	if s > 1 {
		mscale = 0.1*math.Log(s) + 1
	}
	if r.AttentionFactor != nil {
		mscale = *r.AttentionFactor
	}
	return invFreq, float32(mscale)
}
