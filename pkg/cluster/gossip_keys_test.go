package cluster

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func newGossipKey(t *testing.T) []byte {
	t.Helper()
	k := make([]byte, gossipKeySize)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	return k
}

// writeGossipKeys writes keys to path in the KeyFile format, the primary
// first.
func writeGossipKeys(t *testing.T, path string, keys ...[]byte) {
	t.Helper()
	var b strings.Builder
	for _, k := range keys {
		b.WriteString(base64.StdEncoding.EncodeToString(k))
		b.WriteByte('\n')
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
}

// keyFileWith writes a new key file in t's temporary directory.
func keyFileWith(t *testing.T, name string, keys ...[]byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name+".key")
	writeGossipKeys(t, path, keys...)
	return path
}

func startKeyedGossip(t *testing.T, name, keyFile string, seeds ...string) *Gossip {
	t.Helper()
	g, err := JoinGossip(GossipConfig{Name: name, Seeds: seeds, Fast: true, KeyFile: keyFile})
	if err != nil {
		t.Fatalf("JoinGossip %s: %v", name, err)
	}
	t.Cleanup(func() { g.Close() })
	return g
}

// eventRecorder keeps every event a node delivers from now on.
type eventRecorder struct {
	mu   sync.Mutex
	evs  []MemberEvent
	stop chan struct{}
	done chan struct{}
}

func recordEvents(g *Gossip) *eventRecorder {
	r := &eventRecorder{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(r.done)
		for {
			select {
			case ev, ok := <-g.Events():
				if !ok {
					return
				}
				r.mu.Lock()
				r.evs = append(r.evs, ev)
				r.mu.Unlock()
			case <-r.stop:
				return
			}
		}
	}()
	return r
}

// finish stops recording and returns what was seen.
func (r *eventRecorder) finish() []MemberEvent {
	close(r.stop)
	<-r.done
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.evs
}

// deaths returns the events among evs that report a member gone.
func deaths(evs []MemberEvent) []MemberEvent {
	var out []MemberEvent
	for _, ev := range evs {
		if !ev.Alive {
			out = append(out, ev)
		}
	}
	return out
}

func memberNames(g *Gossip) []string {
	var names []string
	for _, n := range g.ml.Members() {
		names = append(names, n.Name)
	}
	return names
}

func TestGossipKeysSameKeyJoins(t *testing.T) {
	key := newGossipKey(t)
	// Two files holding the same key, as on two hosts.
	a := startKeyedGossip(t, "a", keyFileWith(t, "a", key))
	b := startKeyedGossip(t, "b", keyFileWith(t, "b", key), a.Addr())
	waitJoins(t, a, true, 3*time.Second, "a", "b")
	waitJoins(t, b, true, 3*time.Second, "a", "b")
	if a.keyring == nil || b.keyring == nil {
		t.Fatal("encryption not enabled with a key file")
	}
	// A node without a key file is unchanged: plaintext, reload refused.
	p := startGossip(t, "plain", nil)
	if p.keyring != nil {
		t.Fatal("encryption enabled without a key file")
	}
	if err := p.ReloadKeys(); err == nil {
		t.Fatal("ReloadKeys without a key file succeeded")
	}
}

// TestGossipKeysOutsidersCannotJoin: a member with a wrong key and one with
// no key cannot join an encrypted cluster, nor be joined by it, and
// hammering it with joins for a few seconds neither adds them nor causes
// any death.
func TestGossipKeysOutsidersCannotJoin(t *testing.T) {
	key := newGossipKey(t)
	kf := keyFileWith(t, "cluster", key)
	a := startKeyedGossip(t, "a", kf)
	b := startKeyedGossip(t, "b", kf, a.Addr())
	c := startKeyedGossip(t, "c", kf, a.Addr())
	for _, g := range []*Gossip{a, b, c} {
		waitJoins(t, g, true, 3*time.Second, "a", "b", "c")
	}
	recs := map[string]*eventRecorder{"a": recordEvents(a), "b": recordEvents(b), "c": recordEvents(c)}

	wrongFile := keyFileWith(t, "wrong", newGossipKey(t))
	start := time.Now()
	if g, err := JoinGossip(GossipConfig{Name: "wrong", Seeds: []string{a.Addr()}, Fast: true, KeyFile: wrongFile}); err == nil {
		g.Close()
		t.Fatal("member with a wrong key joined")
	} else {
		t.Logf("wrong key refused in %s: %v", time.Since(start).Round(time.Millisecond), err)
	}
	start = time.Now()
	if g, err := JoinGossip(GossipConfig{Name: "plain", Seeds: []string{b.Addr()}, Fast: true}); err == nil {
		g.Close()
		t.Fatal("member without a key joined")
	} else {
		t.Logf("no key refused in %s: %v", time.Since(start).Round(time.Millisecond), err)
	}

	// Running beside the cluster: both outsiders keep trying to join every
	// member (under names of live members too), and the cluster tries to
	// join them.
	wrong := startKeyedGossip(t, "b", wrongFile)
	plain := startGossip(t, "c", nil)
	seeds := []string{a.Addr(), b.Addr(), c.Addr()}
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		if err := wrong.Join(seeds); err == nil {
			t.Fatal("member with a wrong key joined")
		}
		if err := plain.Join(seeds); err == nil {
			t.Fatal("member without a key joined")
		}
		if err := a.Join([]string{wrong.Addr()}); err == nil {
			t.Fatal("cluster joined a member with a wrong key")
		}
		if err := a.Join([]string{plain.Addr()}); err == nil {
			t.Fatal("cluster joined a member without a key")
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Let the failure detector run a while longer.
	time.Sleep(time.Second)

	for name, r := range recs {
		evs := r.finish()
		if d := deaths(evs); len(d) > 0 {
			t.Errorf("%s saw live members die beside outsiders: %+v", name, d)
		}
		for _, ev := range evs {
			if ev.Addr == wrong.Addr() || ev.Addr == plain.Addr() {
				t.Errorf("%s saw an outsider: %+v", name, ev)
			}
		}
	}
	for _, g := range []*Gossip{a, b, c} {
		if n := g.ml.NumMembers(); n != 3 {
			t.Errorf("%s has %d members %v, want 3", g.ml.LocalNode().Name, n, memberNames(g))
		}
	}
	if n := wrong.ml.NumMembers(); n != 1 {
		t.Errorf("wrong-key member knows %v", memberNames(wrong))
	}
	if n := plain.ml.NumMembers(); n != 1 {
		t.Errorf("keyless member knows %v", memberNames(plain))
	}
}

// TestGossipKeysRotation rotates the key of a steady three-member cluster
// with the three-step procedure of ReloadKeys, members reloading one after
// another, and expects no death; then checks the old key is gone and that
// skipping a step is detected (so the watch for deaths is real).
func TestGossipKeysRotation(t *testing.T) {
	oldKey, newKey := newGossipKey(t), newGossipKey(t)
	names := []string{"a", "b", "c"}
	files := map[string]string{}
	nodes := map[string]*Gossip{}
	for _, name := range names {
		files[name] = keyFileWith(t, name, oldKey)
		var seeds []string
		if name != "a" {
			seeds = []string{nodes["a"].Addr()}
		}
		nodes[name] = startKeyedGossip(t, name, files[name], seeds...)
	}
	recs := map[string]*eventRecorder{}
	for _, name := range names {
		waitJoins(t, nodes[name], true, 3*time.Second, names...)
		recs[name] = recordEvents(nodes[name])
	}

	// Each step is applied member by member, with a pause longer than a
	// few probe intervals between members so that mixed states are
	// exercised.
	steps := []struct {
		what string
		keys [][]byte
	}{
		{"add the new key second", [][]byte{oldKey, newKey}},
		{"make the new key primary", [][]byte{newKey, oldKey}},
		{"remove the old key", [][]byte{newKey}},
	}
	start := time.Now()
	for _, st := range steps {
		for _, name := range names {
			writeGossipKeys(t, files[name], st.keys...)
			if err := nodes[name].ReloadKeys(); err != nil {
				t.Fatalf("%s: %s: ReloadKeys: %v", st.what, name, err)
			}
			ring := nodes[name].keyring.GetKeys()
			if len(ring) != len(st.keys) {
				t.Fatalf("%s: %s: %d keys installed, want %d", st.what, name, len(ring), len(st.keys))
			}
			for i := range ring {
				if !bytes.Equal(ring[i], st.keys[i]) {
					t.Fatalf("%s: %s: key %d differs from the file's", st.what, name, i)
				}
			}
			time.Sleep(500 * time.Millisecond)
		}
	}
	time.Sleep(time.Second)
	t.Logf("rotation took %s", time.Since(start).Round(time.Millisecond))
	for _, name := range names {
		if d := deaths(recs[name].finish()); len(d) > 0 {
			t.Errorf("%s saw deaths during the rotation: %+v", name, d)
		}
		if n := nodes[name].ml.NumMembers(); n != 3 {
			t.Errorf("%s has %d members after the rotation, want 3", name, n)
		}
	}

	// The old key no longer opens the cluster; the new one does.
	if g, err := JoinGossip(GossipConfig{Name: "old", Seeds: []string{nodes["a"].Addr()}, Fast: true, KeyFile: keyFileWith(t, "old", oldKey)}); err == nil {
		g.Close()
		t.Fatal("member with the removed key joined")
	}
	d := startKeyedGossip(t, "d", keyFileWith(t, "d", newKey), nodes["b"].Addr())
	waitJoins(t, d, true, 3*time.Second, "a", "b", "c", "d")

	// Skipping ahead: c alone switches to a key nobody else has, and is
	// cut off and declared dead.
	writeGossipKeys(t, files["c"], newGossipKey(t))
	if err := nodes["c"].ReloadKeys(); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	waitEvent(t, nodes["a"], "c", false, 5*time.Second)
	t.Logf("a member cut off by a skipped step declared dead in %s", time.Since(start).Round(10*time.Millisecond))
}

func TestGossipKeysBadFiles(t *testing.T) {
	dir := t.TempDir()
	good := base64.StdEncoding.EncodeToString(newGossipKey(t))
	short := base64.StdEncoding.EncodeToString(make([]byte, 16))
	cases := []struct {
		name, content string
		want          []string
	}{
		{"empty", "", []string{"no key"}},
		{"blank", "\n  \n# a comment\n", []string{"no key"}},
		{"badbase64", good + "\nnot base64!\n", []string{"line 2", "not base64"}},
		{"short", "\n" + short + "\n", []string{"line 2", "16 bytes", "want 32"}},
		{"dup", good + "\n" + good + "\n", []string{"line 2", "same key as line 1"}},
	}
	for _, c := range cases {
		path := filepath.Join(dir, c.name+".key")
		if err := os.WriteFile(path, []byte(c.content), 0o600); err != nil {
			t.Fatal(err)
		}
		g, err := JoinGossip(GossipConfig{Name: c.name, Fast: true, KeyFile: path})
		if err == nil {
			g.Close()
			t.Errorf("%s: key file accepted", c.name)
			continue
		}
		for _, w := range append([]string{path}, c.want...) {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q does not mention %q", c.name, err, w)
			}
		}
		t.Logf("%s: %v", c.name, err)
	}
	missing := filepath.Join(dir, "missing.key")
	if _, err := JoinGossip(GossipConfig{Name: "missing", Fast: true, KeyFile: missing}); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing key file: %v", err)
	}
	// Windows line endings and surrounding spaces are accepted.
	crlf := filepath.Join(dir, "crlf.key")
	if err := os.WriteFile(crlf, []byte("  "+good+" \r\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	g := startKeyedGossip(t, "crlf", crlf)

	// A bad file at reload is refused and the keys in use are kept.
	before := g.keyring.GetKeys()
	if err := os.WriteFile(crlf, []byte("AAAA\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := g.ReloadKeys(); err == nil || !strings.Contains(err.Error(), crlf) || !strings.Contains(err.Error(), "line 1") {
		t.Fatalf("reload of a bad file: %v", err)
	}
	after := g.keyring.GetKeys()
	if len(after) != 1 || !bytes.Equal(after[0], before[0]) {
		t.Fatal("keys changed by a failed reload")
	}
}
