package sampling

import "math"

// Candidate is one token with its raw logit and its log-probability.
type Candidate struct {
	ID      int32
	Logit   float32
	Logprob float32
}

// LogSumExp returns log(sum(exp(row))) computed in float64 with a max shift,
// so it neither overflows nor underflows; its absolute error is below 1e-9. It is -Inf for an empty row or a row
// of -Inf only, +Inf if the row holds +Inf, and NaN if the row holds NaN.
func LogSumExp(row []float32) float64 {
	m := math.Inf(-1)
	for _, v := range row {
		if f := float64(v); f > m {
			m = f
		}
	}
	if math.IsInf(m, 0) {
		// Empty, all -Inf (possibly with NaN), or +Inf present.
		for _, v := range row {
			if v != v {
				return math.NaN()
			}
		}
		return m
	}
	// Terms below exp(-87) of the largest cannot move the float64 sum of a
	// realistic row (V*exp(-87) < 1e-30); the others use expNeg (relative
	// error < 1e-10).
	var sum float64
	for _, v := range row {
		if d := float64(v) - m; d > -87 {
			sum += expNeg(d)
		}
	}
	return m + math.Log(sum)
}

// TopN returns the n highest logits of row in descending order (ties: lower
// id first), with Logprob = logit - lse (lse usually LogSumExp(row); a -Inf
// logit has Logprob -Inf). n is
// clamped to len(row); n <= 0 gives nil. NaN logits rank as -Inf. It runs
// in O(V log n) with a size-n heap and allocates only the result.
func TopN(row []float32, n int, lse float64) []Candidate {
	n = min(n, len(row))
	if n <= 0 {
		return nil
	}
	ids := selectTop(row, n, make([]int32, 0, n))
	out := make([]Candidate, len(ids))
	for i, id := range ids {
		out[i] = Candidate{ID: id, Logit: row[id], Logprob: logprob(row[id], lse)}
	}
	return out
}

// logprob is logit - lse, and -Inf for a -Inf logit even when lse is -Inf.
func logprob(logit float32, lse float64) float32 {
	if math.IsInf(float64(logit), -1) {
		return logit
	}
	return float32(float64(logit) - lse)
}

// rankKey is the ordering key of a logit: NaN ranks as -Inf.
func rankKey(v float32) float32 {
	if v != v {
		return float32(math.Inf(-1))
	}
	return v
}

// worse reports whether token a ranks below token b: lower logit, or equal
// logit and higher id.
func worse(row []float32, a, b int32) bool {
	ka, kb := rankKey(row[a]), rankKey(row[b])
	return ka < kb || (ka == kb && a > b)
}

// siftDown restores the min-heap property (worst token at the root) of h
// from position i.
func siftDown(row []float32, h []int32, i int) {
	n := len(h)
	for {
		l := 2*i + 1
		if l >= n {
			return
		}
		c := l
		if r := l + 1; r < n && worse(row, h[r], h[l]) {
			c = r
		}
		if !worse(row, h[c], h[i]) {
			return
		}
		h[i], h[c] = h[c], h[i]
		i = c
	}
}

// selectTop writes the ids of the n best tokens of row (1 <= n <= len(row))
// into buf (reused, grown if needed) and returns them best first.
func selectTop(row []float32, n int, buf []int32) []int32 {
	h := buf[:0]
	for i := range n {
		h = append(h, int32(i))
	}
	for i := n/2 - 1; i >= 0; i-- {
		siftDown(row, h, i)
	}
	if n < len(row) {
		rootKey := rankKey(row[h[0]])
		for i := n; i < len(row); i++ {
			// A later id only beats the root with a strictly larger logit.
			// NaN never compares greater, so it never enters here.
			if row[i] > rootKey {
				h[0] = int32(i)
				siftDown(row, h, 0)
				rootKey = rankKey(row[h[0]])
			}
		}
	}
	// Heap sort: repeatedly move the worst to the end -> best first.
	for end := n - 1; end > 0; end-- {
		h[0], h[end] = h[end], h[0]
		siftDown(row, h[:end], 0)
	}
	return h
}
