package cluster

import (
	"bytes"
	"testing"
)

// TestGossipKeysReloadOrder: after each reload the keyring holds exactly
// the file's keys in file order, the first primary, whether the change is a
// step of the rotation procedure (keys appended, the first made primary, the
// last removed) or anything else (lines reordered, a middle key removed).
func TestGossipKeysReloadOrder(t *testing.T) {
	k1, k2, k3, k4 := newGossipKey(t), newGossipKey(t), newGossipKey(t), newGossipKey(t)
	path := keyFileWith(t, "node", k1)
	g := startKeyedGossip(t, "node", path)
	for _, step := range []struct {
		what string
		keys [][]byte
	}{
		{"add two keys", [][]byte{k1, k2, k3}},
		{"swap the non-primary lines", [][]byte{k1, k3, k2}},
		{"remove a middle key", [][]byte{k1, k2}},
		{"make the second primary", [][]byte{k2, k1}},
		{"add one, remove the first, switch primary", [][]byte{k4, k2}},
		{"remove the last", [][]byte{k4}},
	} {
		writeGossipKeys(t, path, step.keys...)
		if err := g.ReloadKeys(); err != nil {
			t.Fatalf("%s: %v", step.what, err)
		}
		ring := g.keyring.GetKeys()
		if len(ring) != len(step.keys) {
			t.Fatalf("%s: %d keys in the ring, want %d", step.what, len(ring), len(step.keys))
		}
		for i := range ring {
			if !bytes.Equal(ring[i], step.keys[i]) {
				t.Fatalf("%s: ring key %d is not the file's line %d", step.what, i, i+1)
			}
		}
		if !bytes.Equal(g.keyring.GetPrimaryKey(), step.keys[0]) {
			t.Fatalf("%s: primary is not the first line", step.what)
		}
	}
}
