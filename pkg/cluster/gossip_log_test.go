package cluster

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// noKeyIn fails t when a line holds one of keys (base64, as in a key file).
func noKeyIn(t *testing.T, rec *logLines, keys ...[]byte) {
	t.Helper()
	all := rec.all()
	for _, k := range keys {
		if strings.Contains(all, base64.StdEncoding.EncodeToString(k)) {
			t.Errorf("a gossip key is in the log:\n%s", all)
		}
	}
}

// TestGossipWrongKeyRefusedOnce: a keyed member logs the members that
// reach it under a wrong key, or none, as refusals of listener "gossip",
// once per remote host however often they try; a stray UDP packet from
// another host is its own line; no key is logged.
func TestGossipWrongKeyRefusedOnce(t *testing.T) {
	key, wrongKey := newGossipKey(t), newGossipKey(t)
	rec := &logLines{}
	a, err := JoinGossip(GossipConfig{Name: "a", Fast: true, KeyFile: keyFileWith(t, "a", key), Log: slog.New(rec)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })

	wrongFile := keyFileWith(t, "wrong", wrongKey)
	for i := range 3 {
		if g, err := JoinGossip(GossipConfig{Name: "wrong", Seeds: []string{a.Addr()}, Fast: true, KeyFile: wrongFile}); err == nil {
			g.Close()
			t.Fatalf("try %d: a member with a wrong key joined", i)
		}
	}
	if g, err := JoinGossip(GossipConfig{Name: "plain", Seeds: []string{a.Addr()}, Fast: true}); err == nil {
		g.Close()
		t.Fatal("a member without a key joined")
	}
	if lines := rec.waitMatching("refused a connection", "remote=127.0.0.1:"); len(lines) != 1 || !strings.Contains(lines[0], "listener=gossip") || !strings.Contains(lines[0], "decrypt") {
		t.Errorf("127.0.0.1 logged %d times, want once on gossip with a decrypt reason:\n%s", len(lines), rec.all())
	}

	// A packet under no key, from 127.0.0.2's UDP socket.
	ua, err := net.ResolveUDPAddr("udp", a.Addr())
	if err != nil {
		t.Fatal(err)
	}
	uc, err := net.DialUDP("udp", &net.UDPAddr{IP: net.ParseIP("127.0.0.2")}, ua)
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	junk := make([]byte, 100)
	rand.Read(junk)
	junk[0] = 1 // encryption version 1, so that decryption is tried
	for range 3 {
		if _, err := uc.Write(junk); err != nil {
			t.Fatal(err)
		}
	}
	if lines := rec.waitMatching("refused a connection", "remote=127.0.0.2:"); len(lines) != 1 || !strings.Contains(lines[0], "Decrypt packet failed") {
		t.Errorf("127.0.0.2 logged %d times, want once:\n%s", len(lines), rec.all())
	}
	if n := len(rec.matching("refused a connection")); n != 2 {
		t.Errorf("%d refusal lines, want 2:\n%s", n, rec.all())
	}
	if names := memberNames(a); len(names) != 1 {
		t.Errorf("members %v", names)
	}
	noKeyIn(t, rec, key, wrongKey)
	t.Logf("logged:\n%s", rec.all())
}

// TestMemberlistLogLines: memberlist's lines are sorted by level, the
// refusals recognised, and the lines above Debug bounded a minute.
func TestMemberlistLogLines(t *testing.T) {
	for _, c := range []struct {
		line, text string
		level      slog.Level
	}{
		{"[ERR] memberlist: Failed to send gossip to 1.2.3.4:5: x\n", "Failed to send gossip to 1.2.3.4:5: x", slog.LevelWarn},
		{"[WARN] memberlist: Refuting a suspect message (from: b)\n", "Refuting a suspect message (from: b)", slog.LevelWarn},
		{"[INFO] memberlist: Marking b as failed\n", "Marking b as failed", slog.LevelInfo},
		{"[DEBUG] memberlist: Stream connection from=1.2.3.4:5\n", "Stream connection from=1.2.3.4:5", slog.LevelDebug},
		{"Err: Could not set the deadline: x\n", "Err: Could not set the deadline: x", slog.LevelWarn},
	} {
		if level, text := parseMemberlistLine(c.line); level != c.level || text != c.text {
			t.Errorf("%q: %v %q", c.line, level, text)
		}
	}
	for _, c := range []struct {
		text, remote string
		ok           bool
	}{
		{"Decrypt packet failed: no installed keys could decrypt the message from=10.0.0.1:7946", "10.0.0.1:7946", true},
		{"failed to receive: encryption is configured but remote state is not encrypted from=10.0.0.2:40000", "10.0.0.2:40000", true},
		{"discarding packet with unacceptable label \"x\": from=10.0.0.3:1", "10.0.0.3:1", true},
		{"Stream connection from=10.0.0.1:1", "", false},
		{"Push/Pull with b failed: no installed keys could decrypt the message", "", false},
	} {
		remote, _, ok := gossipRefusal(c.text)
		if ok != c.ok || remote != c.remote {
			t.Errorf("%q: %q %v", c.text, remote, ok)
		}
	}

	rec := &logLines{}
	w := newMemberlistLog(slog.New(rec))
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	w.now = func() time.Time { return now }
	for range 25 {
		w.Write([]byte("[ERR] memberlist: Failed to send gossip to 1.2.3.4:5: refused\n"))
		w.Write([]byte("[DEBUG] memberlist: Stream connection from=1.2.3.4:5\n"))
	}
	if n := len(rec.matching("WARN memberlist: Failed to send gossip")); n != memberlistLinesPerMinute {
		t.Errorf("%d error lines in a minute, want %d", n, memberlistLinesPerMinute)
	}
	if n := len(rec.matching("DEBUG memberlist: Stream connection")); n != 25 {
		t.Errorf("%d debug lines, want 25", n)
	}
	now = now.Add(time.Minute)
	w.Write([]byte("[INFO] memberlist: Marking b as failed\n"))
	if n := len(rec.matching("not_logged=15")); n != 1 {
		t.Errorf("no line saying 15 were not logged:\n%s", rec.all())
	}
	if n := len(rec.matching("INFO memberlist: Marking b as failed")); n != 1 {
		t.Errorf("the next minute's line not logged:\n%s", rec.all())
	}
}

// TestGossipWatchKeys: WatchKeys reloads the keyring when the key file
// changes and logs it without key material; a broken file is logged once
// and the keys in use kept; it ends with ctx or the node, and refuses a
// node without a key file.
func TestGossipWatchKeys(t *testing.T) {
	k1, k2 := newGossipKey(t), newGossipKey(t)
	path := keyFileWith(t, "node", k1)
	rec := &logLines{}
	g, err := JoinGossip(GossipConfig{Name: "node", Fast: true, KeyFile: path, Log: slog.New(rec)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ended := make(chan error, 1)
	go func() { ended <- g.WatchKeys(ctx, 20*time.Millisecond) }()

	// Replaced by rename (a new inode), as qwenctl writes it.
	replace := func(keys ...[]byte) {
		tmp := filepath.Join(filepath.Dir(path), ".node.key.tmp")
		writeGossipKeys(t, tmp, keys...)
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	replace(k1, k2)
	waitFor(t, 3*time.Second, "the second key", func() bool { return len(g.keyring.GetKeys()) == 2 })
	if lines := rec.waitMatching("gossip keys reloaded", "keys=2"); len(lines) != 1 {
		t.Errorf("reload logged %d times:\n%s", len(lines), rec.all())
	}

	// Written in place (same inode), a broken line: logged once, keys kept.
	if err := os.WriteFile(path, []byte(base64.StdEncoding.EncodeToString(k1)+"\nnot base64!\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // many polls
	if lines := rec.matching("not reloaded", "line 2"); len(lines) != 1 {
		t.Errorf("a broken file logged %d times:\n%s", len(lines), rec.all())
	}
	if n := len(g.keyring.GetKeys()); n != 2 {
		t.Errorf("%d keys after a broken file, want the 2 in use", n)
	}

	// Fixed: the second key becomes primary.
	replace(k2, k1)
	waitFor(t, 3*time.Second, "k2 primary", func() bool { return string(g.keyring.GetPrimaryKey()) == string(k2) })
	noKeyIn(t, rec, k1, k2)

	cancel()
	select {
	case err := <-ended:
		if err != nil {
			t.Errorf("WatchKeys: %v", err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("WatchKeys outlived its ctx")
	}
	// It also ends with the node.
	go func() { ended <- g.WatchKeys(context.Background(), 20*time.Millisecond) }()
	g.Close()
	select {
	case <-ended:
	case <-time.After(3 * time.Second):
		t.Fatal("WatchKeys outlived the node")
	}

	p := startGossip(t, "plain", nil)
	if err := p.WatchKeys(context.Background(), time.Second); err == nil {
		t.Error("WatchKeys without a key file accepted")
	}
	t.Logf("logged:\n%s", rec.all())
}
