package cluster

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// MaxGossipMeta is the largest Meta a gossip node may carry.
const MaxGossipMeta = memberlist.MetaMaxSize

// gossipEventBuffer is the capacity of Gossip.Events.
const gossipEventBuffer = 256

// gossipLeaveTimeout bounds the graceful leave broadcast in Close.
const gossipLeaveTimeout = 500 * time.Millisecond

// GossipConfig configures JoinGossip.
type GossipConfig struct {
	// Name must be unique in the cluster; default hostname plus a random
	// suffix.
	Name string
	// BindAddr is the address to listen on; default "127.0.0.1".
	BindAddr string
	// BindPort is the UDP/TCP port; 0 picks a free one.
	BindPort int
	// AdvertiseAddr is the address announced to peers; default BindAddr
	// (memberlist picks a private IP when BindAddr is 0.0.0.0).
	AdvertiseAddr string
	// Seeds are host:port addresses of existing members to join.
	Seeds []string
	// Meta is opaque node metadata gossiped to all members (at most 512
	// bytes).
	Meta []byte
	// Fast selects aggressive timings (200ms probes, 100ms probe timeout,
	// 50ms gossip, suspicion multiplier 2) that detect a dead peer in under
	// a second on a LAN or loopback. Otherwise memberlist's LAN defaults
	// are used (1s probes, 500ms timeout, multiplier 4: several seconds).
	Fast bool
	// ProbeInterval, ProbeTimeout and SuspicionMult, when > 0, replace the
	// timings above: a member is probed every ProbeInterval, a probe fails
	// after ProbeTimeout (then indirect probes through other members), and
	// a suspect is declared dead after SuspicionMult × max(1, log10(N)) ×
	// ProbeInterval unless it refutes.
	ProbeInterval, ProbeTimeout time.Duration
	SuspicionMult               int
	// KeyFile, when set, encrypts and authenticates all gossip (AES-256-GCM)
	// with the keys it lists: one base64 32-byte key a line (blank lines and
	// lines starting with # are skipped), the first the primary, used to
	// encrypt; every listed key is accepted when decrypting. This is the
	// gossip.key that `qwenctl certs` writes. Plaintext and messages under
	// other keys are dropped, so a member without a listed key can neither
	// join nor spread suspicion or death. Rotate keys with ReloadKeys (or
	// WatchKeys). Empty: gossip is plaintext.
	KeyFile string
	// Log, when set, receives memberlist's log: a message or stream that
	// fails decryption (a member with a wrong key, or none) as a refusal of
	// listener "gossip", logged once per remote host (security.Refusals);
	// memberlist's other warnings and errors at Warn and its notices at
	// Info, at most 10 such lines a minute (the rest counted in one line);
	// its debug lines at Debug. WatchKeys logs its reloads here. Nil:
	// memberlist's log is discarded.
	Log *slog.Logger
}

// MemberEvent describes a member, or a change to one: Alive is false when the
// member left or was declared dead.
type MemberEvent struct {
	Name  string
	Addr  string
	Meta  []byte
	Alive bool
}

// Gossip is a running memberlist node.
type Gossip struct {
	ml   *memberlist.Memberlist
	addr string
	meta []byte // set before the node starts, never changed

	keyFile  string              // GossipConfig.KeyFile
	keyring  *memberlist.Keyring // nil when gossip is plaintext
	keyMu    sync.Mutex          // serialises ReloadKeys
	keyStamp os.FileInfo         // the key file's, taken before JoinGossip read it

	log  *slog.Logger  // GossipConfig.Log, or a discarding one
	done chan struct{} // closed when the node stops

	evMu     sync.Mutex
	events   chan MemberEvent
	evClosed bool

	closeOnce sync.Once
	closeErr  error
}

// JoinGossip starts a gossip node and, when cfg.Seeds is non-empty, joins
// them; it fails if none of the seeds can be reached.
func JoinGossip(cfg GossipConfig) (*Gossip, error) {
	if len(cfg.Meta) > MaxGossipMeta {
		return nil, fmt.Errorf("cluster: gossip meta is %d bytes, max %d", len(cfg.Meta), MaxGossipMeta)
	}
	g := &Gossip{
		meta:   append([]byte(nil), cfg.Meta...),
		events: make(chan MemberEvent, gossipEventBuffer),
		log:    cfg.Log,
		done:   make(chan struct{}),
	}
	if g.log == nil {
		g.log = slog.New(slog.DiscardHandler)
	}
	var mc *memberlist.Config
	if cfg.Fast {
		mc = memberlist.DefaultLocalConfig()
		mc.ProbeInterval = 200 * time.Millisecond
		mc.ProbeTimeout = 100 * time.Millisecond
		mc.GossipInterval = 50 * time.Millisecond
		mc.SuspicionMult = 2
		mc.PushPullInterval = 5 * time.Second
	} else {
		mc = memberlist.DefaultLANConfig()
	}
	// A member that comes back at a new address (a worker restarted
	// under the same name) replaces its dead entry after a second rather
	// than never (memberlist's default).
	mc.DeadNodeReclaimTime = time.Second
	if cfg.ProbeInterval > 0 {
		mc.ProbeInterval = cfg.ProbeInterval
	}
	if cfg.ProbeTimeout > 0 {
		mc.ProbeTimeout = cfg.ProbeTimeout
	}
	if cfg.SuspicionMult > 0 {
		mc.SuspicionMult = cfg.SuspicionMult
	}
	if mc.ProbeTimeout > mc.ProbeInterval {
		return nil, fmt.Errorf("cluster: gossip probe timeout %v is longer than the probe interval %v", mc.ProbeTimeout, mc.ProbeInterval)
	}
	if cfg.Name == "" {
		cfg.Name = defaultNodeName()
	}
	if cfg.BindAddr == "" {
		cfg.BindAddr = "127.0.0.1"
	}
	if cfg.KeyFile != "" {
		// The stamp before the read: a change in between is seen by
		// WatchKeys.
		g.keyStamp, _ = os.Stat(cfg.KeyFile)
		keys, err := readGossipKeys(cfg.KeyFile)
		if err != nil {
			return nil, err
		}
		kr, err := memberlist.NewKeyring(keys[1:], keys[0])
		if err != nil {
			return nil, fmt.Errorf("cluster: gossip key file %s: %w", cfg.KeyFile, err)
		}
		g.keyFile = cfg.KeyFile
		g.keyring = kr
		mc.Keyring = kr
		mc.GossipVerifyIncoming = true
		mc.GossipVerifyOutgoing = true
	}
	mc.Name = cfg.Name
	mc.BindAddr = cfg.BindAddr
	mc.BindPort = cfg.BindPort
	mc.AdvertiseAddr = cfg.AdvertiseAddr
	// The port announced is the bound one (memberlist sets it itself only
	// for a port it picks: a fixed BindPort with an AdvertiseAddr would be
	// announced as port 0).
	mc.AdvertisePort = cfg.BindPort
	if cfg.Log != nil {
		mc.Logger = log.New(newMemberlistLog(cfg.Log), "", 0)
	} else {
		mc.LogOutput = io.Discard
	}
	mc.Delegate = (*gossipDelegate)(g)
	mc.Events = (*gossipEvents)(g)

	ml, err := memberlist.Create(mc)
	if err != nil {
		return nil, fmt.Errorf("cluster: start gossip: %w", err)
	}
	g.ml = ml
	local := ml.LocalNode()
	g.addr = net.JoinHostPort(local.Addr.String(), strconv.Itoa(int(local.Port)))
	if len(cfg.Seeds) > 0 {
		if err := g.Join(cfg.Seeds); err != nil {
			g.Close()
			return nil, err
		}
	}
	return g, nil
}

// gossipKeySize is the length of a gossip key: AES-256.
const gossipKeySize = 32

// readGossipKeys parses a gossip key file (see GossipConfig.KeyFile); errors
// name the file and the line.
func readGossipKeys(path string) ([][]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("cluster: gossip key file: %w", err)
	}
	var keys [][]byte
	seen := map[string]int{}
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		n := i + 1
		key, err := base64.StdEncoding.DecodeString(line)
		if err != nil {
			return nil, fmt.Errorf("cluster: gossip key file %s: line %d: not base64: %v", path, n, err)
		}
		if len(key) != gossipKeySize {
			return nil, fmt.Errorf("cluster: gossip key file %s: line %d: key is %d bytes, want %d (AES-256)", path, n, len(key), gossipKeySize)
		}
		if first, dup := seen[string(key)]; dup {
			return nil, fmt.Errorf("cluster: gossip key file %s: line %d: same key as line %d", path, n, first)
		}
		seen[string(key)] = n
		keys = append(keys, key)
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("cluster: gossip key file %s: no key in it (want base64 %d-byte keys, one a line, the primary first)", path, gossipKeySize)
	}
	return keys, nil
}

// ReloadKeys re-reads GossipConfig.KeyFile and makes the keyring match it:
// keys new to the file are installed, its first line becomes the primary
// (the key this node encrypts with) and keys no longer listed are removed.
// If the file is unreadable or invalid, the error names the file and line
// and the keys in use are kept. It fails when the node was started without
// a KeyFile (encryption cannot be turned on in a running cluster).
//
// Rotating the cluster's key without a false death (every member must be
// able to read what every other sends at each moment):
//
//  1. Add the new key as the second line of the key file on every member,
//     and reload each: all members now accept both keys but still send
//     with the old one.
//  2. Once every member has reloaded, move the new key to the first line
//     everywhere and reload each: members switch to sending with the new
//     key, which all of them already accept.
//  3. Once every member has reloaded, delete the old key's line everywhere
//     and reload each.
//
// Skipping ahead (making a key primary before every member has it, or
// removing one that a member still sends with) cuts members off from each
// other and they will be declared dead.
func (g *Gossip) ReloadKeys() error {
	if g.keyring == nil {
		return errors.New("cluster: gossip was started without a key file; cannot reload keys")
	}
	g.keyMu.Lock()
	defer g.keyMu.Unlock()
	keys, err := readGossipKeys(g.keyFile)
	if err != nil {
		return err
	}
	kr := g.keyring
	for _, k := range keys {
		if err := kr.AddKey(k); err != nil {
			return fmt.Errorf("cluster: gossip key file %s: %w", g.keyFile, err)
		}
	}
	// The ring must end up as the listed keys in file order followed by
	// the ones to remove: memberlist's RemoveKey shifts the keys after the
	// removed one in place, under readers that may be decrypting with that
	// slice; removing only the last key shifts nothing. AddKey appends, so
	// the three steps of the procedure below only need the file's first
	// key made primary. Any other change (non-primary lines reordered, a
	// middle key removed) moves every listed key to the front, the primary
	// last; that makes each of them primary for an instant, and a packet
	// sent in that instant may be unreadable by members lacking the key.
	if err := kr.UseKey(keys[0]); err != nil {
		return fmt.Errorf("cluster: gossip key file %s: %w", g.keyFile, err)
	}
	if !ringStartsWith(kr.GetKeys(), keys) {
		for i := len(keys) - 1; i >= 0; i-- {
			if err := kr.UseKey(keys[i]); err != nil {
				return fmt.Errorf("cluster: gossip key file %s: %w", g.keyFile, err)
			}
		}
	}
	for {
		ring := kr.GetKeys()
		if len(ring) <= len(keys) {
			break
		}
		if err := kr.RemoveKey(ring[len(ring)-1]); err != nil {
			return fmt.Errorf("cluster: gossip key file %s: %w", g.keyFile, err)
		}
	}
	return nil
}

// WatchKeys polls the key file every interval (1 s when interval <= 0) and
// calls ReloadKeys when the file's size, modification time or inode
// changed, until ctx ends or the node is closed; run it in a goroutine. Each
// reload is logged to GossipConfig.Log: the file and the number of keys
// when it worked, the file and the error (which names the line) when it
// did not, once per change of the file; the keys in use are then kept.
// Nothing logged holds key material. It returns an error at once when the
// node was started without a KeyFile, and nil when it ends.
//
// A rewrite within the file system's timestamp granularity that keeps the
// size and the inode is not seen (write the file to a temporary name and
// rename it, as `qwenctl certs` does, or call ReloadKeys).
func (g *Gossip) WatchKeys(ctx context.Context, interval time.Duration) error {
	if g.keyring == nil {
		return errors.New("cluster: gossip was started without a key file; nothing to watch")
	}
	if interval <= 0 {
		interval = time.Second
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	seen := g.keyStamp
	statFailed := false
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-g.done:
			return nil
		case <-t.C:
		}
		fi, err := os.Stat(g.keyFile)
		if err != nil {
			if !statFailed {
				g.log.Warn("gossip key file unreadable; the keys in use are kept", "file", g.keyFile, "err", err)
				statFailed = true
			}
			continue
		}
		statFailed = false
		if seen != nil && sameFileStamp(fi, seen) {
			continue
		}
		seen = fi
		if err := g.ReloadKeys(); err != nil {
			g.log.Error("gossip key file not reloaded; the keys in use are kept", "file", g.keyFile, "err", err)
			continue
		}
		g.log.Info("gossip keys reloaded", "file", g.keyFile, "keys", len(g.keyring.GetKeys()))
	}
}

// sameFileStamp reports whether a and b have the same size, modification
// time and inode.
func sameFileStamp(a, b os.FileInfo) bool {
	return a.Size() == b.Size() && a.ModTime().Equal(b.ModTime()) && os.SameFile(a, b)
}

// ringStartsWith reports whether ring begins with keys, in order.
func ringStartsWith(ring, keys [][]byte) bool {
	if len(ring) < len(keys) {
		return false
	}
	for i, k := range keys {
		if !bytes.Equal(ring[i], k) {
			return false
		}
	}
	return true
}

func defaultNodeName() string {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "node"
	}
	var b [4]byte
	rand.Read(b[:])
	return host + "-" + hex.EncodeToString(b[:])
}

// Addr returns the host:port this node is bound to and advertises.
func (g *Gossip) Addr() string { return g.addr }

// Events returns join, update, leave and failure events. The channel is
// buffered; when the consumer falls behind the oldest events are dropped, so
// memberlist is never blocked. It is closed by Close.
func (g *Gossip) Events() <-chan MemberEvent { return g.events }

// Join contacts seeds (host:port) and merges state with them. It succeeds if
// at least one seed answered.
func (g *Gossip) Join(seeds []string) error {
	if len(seeds) == 0 {
		return nil
	}
	n, err := g.ml.Join(seeds)
	if n == 0 {
		if err == nil {
			err = errors.New("no seed answered")
		}
		return fmt.Errorf("cluster: gossip join %v: %w", seeds, err)
	}
	return nil
}

// Close broadcasts a leave (waiting at most 500ms) and shuts the node down.
// It closes the Events channel and is idempotent.
func (g *Gossip) Close() error {
	return g.stop(true)
}

// stop shuts the node down once; leave selects a graceful leave first, while
// leave=false makes the node vanish as if it crashed.
func (g *Gossip) stop(leave bool) error {
	g.closeOnce.Do(func() {
		if leave {
			g.ml.Leave(gossipLeaveTimeout)
		}
		g.closeErr = g.ml.Shutdown()
		close(g.done)
		g.evMu.Lock()
		g.evClosed = true
		close(g.events)
		g.evMu.Unlock()
	})
	return g.closeErr
}

func nodeEvent(n *memberlist.Node, alive bool) MemberEvent {
	return MemberEvent{
		Name:  n.Name,
		Addr:  net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port))),
		Meta:  append([]byte(nil), n.Meta...),
		Alive: alive,
	}
}

// emit delivers ev without ever blocking, dropping the oldest event if the
// buffer is full.
func (g *Gossip) emit(ev MemberEvent) {
	g.evMu.Lock()
	defer g.evMu.Unlock()
	if g.evClosed {
		return
	}
	for {
		select {
		case g.events <- ev:
			return
		default:
		}
		select {
		case <-g.events:
		default:
		}
	}
}

type gossipEvents Gossip

func (e *gossipEvents) NotifyJoin(n *memberlist.Node)   { (*Gossip)(e).emit(nodeEvent(n, true)) }
func (e *gossipEvents) NotifyLeave(n *memberlist.Node)  { (*Gossip)(e).emit(nodeEvent(n, false)) }
func (e *gossipEvents) NotifyUpdate(n *memberlist.Node) { (*Gossip)(e).emit(nodeEvent(n, true)) }

type gossipDelegate Gossip

func (d *gossipDelegate) NodeMeta(limit int) []byte {
	if len(d.meta) > limit {
		return nil
	}
	return append([]byte(nil), d.meta...)
}

func (d *gossipDelegate) NotifyMsg([]byte)                           {}
func (d *gossipDelegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (d *gossipDelegate) LocalState(join bool) []byte                { return nil }
func (d *gossipDelegate) MergeRemoteState(buf []byte, join bool)     {}
