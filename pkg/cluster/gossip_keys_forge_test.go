package cluster

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"net"
	"testing"
	"time"

	"github.com/hashicorp/go-msgpack/v2/codec"
)

// forgedDead is memberlist's dead message (net.go, type dead): field names
// matter, memberlist encodes structs as msgpack maps.
type forgedDead struct {
	Incarnation uint32
	Node        string
	From        string
}

// memberlist's message type of a dead message (net.go: pingMsg = 0, ...,
// deadMsg = 5).
const forgedDeadMsg = 5

// forgeDeadPacket builds a UDP packet declaring node dead, as a member would
// send it; key nil leaves it plaintext, otherwise it is sealed the way
// memberlist seals packets (encryption version 1: version byte, 12-byte
// nonce, AES-GCM with the empty label as additional data).
func forgeDeadPacket(t *testing.T, node string, key []byte) []byte {
	t.Helper()
	var msg bytes.Buffer
	msg.WriteByte(forgedDeadMsg)
	if err := codec.NewEncoder(&msg, &codec.MsgpackHandle{}).Encode(&forgedDead{Incarnation: 1 << 30, Node: node, From: "mallory"}); err != nil {
		t.Fatal(err)
	}
	if key == nil {
		return msg.Bytes()
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		t.Fatal(err)
	}
	nonce := make([]byte, gcm.NonceSize())
	rand.Read(nonce)
	return gcm.Seal(append([]byte{1}, nonce...), nonce, msg.Bytes(), nil)
}

func sendUDP(t *testing.T, addr string, pkt []byte) {
	t.Helper()
	conn, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Write(pkt); err != nil {
		t.Fatal(err)
	}
}

// TestGossipKeysForgedDeath sends a member a dead message about a live
// member, as an attacker who can reach the gossip port would. Plaintext and
// under a wrong key it is dropped; the controls (the same packet to a
// plaintext cluster, and under the cluster's key) show that it would
// otherwise take effect.
func TestGossipKeysForgedDeath(t *testing.T) {
	// Control: a plaintext cluster believes it.
	pa := startGossip(t, "pa", nil)
	startGossip(t, "pb", nil, pa.Addr())
	waitJoins(t, pa, true, 3*time.Second, "pa", "pb")
	sendUDP(t, pa.Addr(), forgeDeadPacket(t, "pb", nil))
	waitEvent(t, pa, "pb", false, 2*time.Second)

	key := newGossipKey(t)
	kf := keyFileWith(t, "cluster", key)
	a := startKeyedGossip(t, "a", kf)
	b := startKeyedGossip(t, "b", kf, a.Addr())
	waitJoins(t, a, true, 3*time.Second, "a", "b")
	waitJoins(t, b, true, 3*time.Second, "a", "b")

	recA, recB := recordEvents(a), recordEvents(b)
	wrongKey := newGossipKey(t)
	for i := 0; i < 20; i++ {
		for _, victim := range []string{"a", "b"} {
			for _, to := range []string{a.Addr(), b.Addr()} {
				sendUDP(t, to, forgeDeadPacket(t, victim, nil))
				sendUDP(t, to, forgeDeadPacket(t, victim, wrongKey))
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(time.Second)
	for name, r := range map[string]*eventRecorder{"a": recA, "b": recB} {
		if d := deaths(r.finish()); len(d) > 0 {
			t.Errorf("%s believed a forged death (plaintext or wrong key): %+v", name, d)
		}
	}
	if a.ml.NumMembers() != 2 || b.ml.NumMembers() != 2 {
		t.Fatalf("members after forged deaths: a %v, b %v", memberNames(a), memberNames(b))
	}

	// Control: under the cluster's key the same packet is believed.
	sendUDP(t, a.Addr(), forgeDeadPacket(t, "b", key))
	waitEvent(t, a, "b", false, 2*time.Second)
}

// TestGossipKeysCutOffMemberCannotKill: members sharing a key detect a
// killed member; a member that knew the whole cluster and then lost the key
// (it switches to another one) probes everyone, fails, and spreads
// suspicion and death of all of them under its key, but only it is declared
// dead, never a live member.
func TestGossipKeysCutOffMemberCannotKill(t *testing.T) {
	key := newGossipKey(t)
	kf := keyFileWith(t, "cluster", key)
	dFile := keyFileWith(t, "d", key)
	names := []string{"a", "b", "c", "d"}
	nodes := map[string]*Gossip{}
	var seeds []string // every member so far: joins push-pull with each
	for _, name := range names {
		f := kf
		if name == "d" {
			f = dFile
		}
		nodes[name] = startKeyedGossip(t, name, f, seeds...)
		seeds = append(seeds, nodes[name].Addr())
	}
	for _, name := range names {
		waitJoins(t, nodes[name], true, 5*time.Second, names...)
	}

	// d loses the key.
	recs := map[string]*eventRecorder{}
	for _, name := range names[:3] {
		recs[name] = recordEvents(nodes[name])
	}
	recD := recordEvents(nodes["d"])
	writeGossipKeys(t, dFile, newGossipKey(t))
	if err := nodes["d"].ReloadKeys(); err != nil {
		t.Fatal(err)
	}
	// Wait at least 3 s, and until every live member has declared d dead
	// (at most 15 s: slow under the race detector on a loaded machine).
	start := time.Now()
	for time.Since(start) < 3*time.Second || (!sawDeath(recs["a"], "d") || !sawDeath(recs["b"], "d") || !sawDeath(recs["c"], "d")) && time.Since(start) < 15*time.Second {
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("the cut-off member ran beside the cluster for %s", time.Since(start).Round(10*time.Millisecond))

	// d, on its side, has declared the others dead: it did gossip deaths.
	dSaw := map[string]bool{}
	for _, ev := range deaths(recD.finish()) {
		dSaw[ev.Name] = true
	}
	if len(dSaw) == 0 {
		t.Error("the cut-off member declared no one dead: the test proves nothing")
	}
	t.Logf("the cut-off member declared dead: %v", dSaw)
	for _, name := range names[:3] {
		var died []string
		for _, ev := range deaths(recs[name].finish()) {
			died = append(died, ev.Name)
			if ev.Name != "d" {
				t.Errorf("%s saw live member %s die", name, ev.Name)
			}
		}
		if len(died) == 0 {
			t.Errorf("%s did not declare the cut-off member dead", name)
		}
	}

	// A killed member (no leave message) is detected.
	nodes["c"].stop(false)
	start = time.Now()
	waitEvent(t, nodes["a"], "c", false, 5*time.Second)
	waitEvent(t, nodes["b"], "c", false, 5*time.Second)
	t.Logf("killed member declared dead in %s", time.Since(start).Round(10*time.Millisecond))
}

// sawDeath reports whether r has recorded name's death so far.
func sawDeath(r *eventRecorder, name string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, ev := range r.evs {
		if ev.Name == name && !ev.Alive {
			return true
		}
	}
	return false
}
