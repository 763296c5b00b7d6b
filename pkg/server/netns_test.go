// A small virtual network for end-to-end tests that partition a process
// from the others: Linux network namespaces ("hosts") on a bridge in the
// root namespace, each host's link to the bridge something a test can take
// down (Cut) and bring back (Heal).
//
// Everything it creates (namespaces, veth pairs, the bridge, iptables
// rules) has a name or address of its own, random per test, and is removed
// at the test's cleanup, whether the test passed, failed or skipped. It
// needs root and the ip binary (iproute2); without them, or where a
// namespace or bridge cannot be created, the test is skipped with the
// reason.

package server_test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// netHosts is a bridge in the root namespace plus n namespaces, each with a
// veth link to the bridge.
//
// Addresses: a /24 in 10.213.0.0/16 that no interface or route of the
// machine overlaps; the bridge (the root namespace's side) is .1, host i is
// .(i+2), on the interface eth0 inside its namespace. Each namespace's lo
// is up too, so a process in it can also use 127.0.0.1 (its own: nothing
// outside the namespace reaches it). There are no default routes: the
// hosts reach each other and HostIP, nothing else.
//
// Processes started with Command are the caller's to stop, and must be
// stopped before the network is removed: the removal is a t.Cleanup
// registered by newNetHosts, and cleanups run last-registered first, so a
// caller that registers its processes' cleanup after calling newNetHosts
// (as it does when it starts them afterwards) is fine. A process left
// running keeps its namespace alive (though unnamed and without a link).
//
// Cut, Heal and the constructor fail the test with t.Fatal, so they must be
// called from the test's goroutine.
type netHosts struct {
	t      testing.TB
	prefix netip.Prefix // the /24
	bridge string       // "" until created
	ns     []string     // namespace names, host i's at i
	veth   []string     // the root-namespace ends of the veth pairs
	rules  []iptRule    // iptables rules inserted, deleted at cleanup
}

// iptRule is a rule in the filter table's FORWARD chain, inserted with
// tool (iptables or iptables-legacy).
type iptRule struct {
	tool string
	spec []string
}

// nsIface is the name of a host's link inside its namespace.
const nsIface = "eth0"

// netHostsMu serializes choosing a free address block and taking it (the
// bridge's address), between tests of this process running in parallel.
var netHostsMu sync.Mutex

// newNetHosts builds the network with n hosts (1 to 250), removed at t's
// cleanup, or skips t where it cannot be built (not Linux, not root, no ip,
// no bridges or namespaces).
func newNetHosts(t testing.TB, n int) *netHosts {
	t.Helper()
	if n < 1 || n > 250 {
		t.Fatalf("newNetHosts: %d hosts, want 1 to 250", n)
	}
	if runtime.GOOS != "linux" {
		t.Skip("network namespaces: Linux only")
	}
	if os.Geteuid() != 0 {
		t.Skip("network namespaces: needs root (euid is " + strconv.Itoa(os.Geteuid()) + ")")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("network namespaces: no ip binary (iproute2): " + err.Error())
	}
	// Names: bridge qfb<6 hex>, root-side veth ends qfv<6 hex>-<i> (at most
	// 12 characters, the limit being 15), namespaces qfns-<6 hex>-<i>.
	suffix := fmt.Sprintf("%06x", rand.Uint32()&0xffffff)
	h := &netHosts{t: t}
	t.Cleanup(h.remove) // first, so that it removes whatever got created

	netHostsMu.Lock()
	prefix, err := freePrefix()
	if err != nil {
		netHostsMu.Unlock()
		t.Fatal("newNetHosts:", err)
	}
	h.prefix = prefix
	br := "qfb" + suffix
	if out, err := runIP("link", "add", br, "type", "bridge"); err != nil {
		netHostsMu.Unlock()
		t.Skipf("network namespaces: cannot create a bridge: %v: %s", err, out)
	}
	h.bridge = br
	_, err = runIP("addr", "add", h.HostIP()+"/24", "dev", br)
	netHostsMu.Unlock()
	if err != nil {
		t.Fatal("newNetHosts:", err)
	}
	h.mustIP("link", "set", "dev", br, "up")
	h.allowBridged()

	for i := range n {
		ns := fmt.Sprintf("qfns-%s-%d", suffix, i)
		if out, err := runIP("netns", "add", ns); err != nil {
			if i == 0 {
				t.Skipf("network namespaces: cannot create one: %v: %s", err, out)
			}
			t.Fatalf("newNetHosts: %v: %s", err, out)
		}
		h.ns = append(h.ns, ns)
		veth := fmt.Sprintf("qfv%s-%d", suffix, i)
		h.mustIP("link", "add", veth, "type", "veth", "peer", "name", nsIface, "netns", ns)
		h.veth = append(h.veth, veth)
		h.mustIP("link", "set", "dev", veth, "master", br, "up")
		h.mustIP("-n", ns, "addr", "add", h.IP(i)+"/24", "dev", nsIface)
		h.mustIP("-n", ns, "link", "set", "dev", nsIface, "up")
		h.mustIP("-n", ns, "link", "set", "dev", "lo", "up")
	}
	for i := range n {
		h.waitLink(i, true)
	}
	return h
}

// HostIP is the bridge's address in the root namespace: a process in the
// root namespace binds here to be reachable from the hosts.
func (h *netHosts) HostIP() string { return h.prefix.Addr().Next().String() }

// IP is host i's address, inside its namespace.
func (h *netHosts) IP(i int) string {
	a := h.prefix.Addr().As4()
	a[3] = byte(i + 2)
	return netip.AddrFrom4(a).String()
}

// Command runs bin with args inside host i's namespace, with
// `ip netns exec NAME bin args...`, which execs bin: the process's pid is
// bin's, and signalling it signals bin.
func (h *netHosts) Command(i int, bin string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", h.ns[i], bin}, args...)...)
}

// Cut partitions host i from the rest: the root-namespace end of its veth
// pair goes down. Packets to and from the host are then dropped without a
// trace: the bridge port is disabled (and its forwarding entries flushed),
// and inside the namespace the link keeps its address and routes but has
// no carrier, so what the host sends is discarded by the device. No RST,
// no ICMP error comes back, so a TCP connect times out rather than being
// refused, and connections stay open, their segments retransmitted until
// Heal (or the TCP timeouts). (Taking the namespace's end down instead
// would remove the connected route there, and the host's own connects and
// sends would fail at once with "network is unreachable".) Lookups of
// neighbours not yet cached fail after a few seconds (ARP), which TCP
// reports as "no route to host" to a connect still waiting then.
func (h *netHosts) Cut(i int) {
	h.t.Helper()
	h.mustIP("link", "set", "dev", h.veth[i], "down")
	h.waitLink(i, false)
}

// Heal undoes Cut(i): the link is up again (Heal waits until both ends
// say so), new connections work at once, and existing ones resume at their
// next retransmission.
func (h *netHosts) Heal(i int) {
	h.t.Helper()
	h.mustIP("link", "set", "dev", h.veth[i], "up")
	h.waitLink(i, true)
}

// waitLink waits until both ends of host i's link are operationally up
// (carrier, queueing discipline attached) or, for !up, not.
func (h *netHosts) waitLink(i int, up bool) {
	h.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		root, _ := os.ReadFile("/sys/class/net/" + h.veth[i] + "/operstate")
		rootUp := strings.TrimSpace(string(root)) == "up"
		out, _ := runIP("-n", h.ns[i], "-o", "link", "show", "dev", nsIface)
		nsUp := strings.Contains(out, " state UP ")
		if rootUp == up && nsUp == up {
			return
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("host %d's link: want up=%v, root end %q, namespace end %q",
				i, up, strings.TrimSpace(string(root)), strings.TrimSpace(out))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// allowBridged lets traffic cross the bridge where iptables would drop it.
// With the br_netfilter module loaded (Docker loads it) and its global
// switch net.bridge.bridge-nf-call-iptables on, frames that the bridge
// forwards between two of its ports go through iptables' FORWARD chain,
// whose policy Docker sets to DROP: host to host traffic would vanish
// (traffic between a host and HostIP is local delivery, INPUT and OUTPUT,
// and not affected). The bridge's own nf_call_iptables setting cannot turn
// that off (it only adds to the global switch), and the switch is global,
// so instead a rule at the head of FORWARD accepts what goes from this
// bridge to itself; it is deleted at cleanup. Done for iptables and, where
// the legacy backend has a filter table too, iptables-legacy (both are
// consulted), each only when its FORWARD chain is more than an ACCEPT
// policy. Native nftables rules are not looked at.
func (h *netHosts) allowBridged() {
	t := h.t
	t.Helper()
	v, err := os.ReadFile("/proc/sys/net/bridge/bridge-nf-call-iptables")
	if err != nil || strings.TrimSpace(string(v)) != "1" {
		return // no br_netfilter, or switched off: bridged frames skip iptables
	}
	tools := []string{"iptables"}
	if names, err := os.ReadFile("/proc/net/ip_tables_names"); err == nil && strings.Contains("\n"+string(names), "\nfilter\n") {
		if ver, err := exec.Command("iptables", "-V").Output(); err != nil || !strings.Contains(string(ver), "legacy") {
			tools = append(tools, "iptables-legacy")
		}
	}
	spec := []string{"-i", h.bridge, "-o", h.bridge, "-j", "ACCEPT"}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Logf("newNetHosts: br_netfilter is on and there is no %s: traffic between hosts may be dropped", tool)
			continue
		}
		out, err := exec.Command(tool, "-w", "-S", "FORWARD").Output()
		if err != nil {
			t.Logf("newNetHosts: br_netfilter is on and %s -S FORWARD failed (%v): traffic between hosts may be dropped", tool, err)
			continue
		}
		if onlyAccept(string(out)) {
			continue
		}
		if out, err := exec.Command(tool, append([]string{"-w", "-I", "FORWARD"}, spec...)...).CombinedOutput(); err != nil {
			t.Fatalf("newNetHosts: %s -I FORWARD: %v: %s", tool, err, out)
		}
		h.rules = append(h.rules, iptRule{tool, spec})
	}
}

// onlyAccept says whether an `iptables -S CHAIN` listing is an ACCEPT
// policy and no rules.
func onlyAccept(listing string) bool {
	for line := range strings.Lines(listing) {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, "-P ") && strings.HasSuffix(line, " ACCEPT") {
			continue
		}
		return false
	}
	return true
}

// remove deletes what newNetHosts created, in the order veth pairs (which
// takes their namespace ends along), namespaces, the bridge, the iptables
// rules, and reports what it could not delete.
func (h *netHosts) remove() {
	t := h.t
	for _, veth := range h.veth {
		if out, err := runIP("link", "del", "dev", veth); err != nil && !strings.Contains(out, "Cannot find device") {
			t.Errorf("netHosts cleanup: %v: %s", err, out)
		}
	}
	for _, ns := range h.ns {
		if out, err := runIP("netns", "del", ns); err != nil {
			t.Errorf("netHosts cleanup: %v: %s", err, out)
		}
	}
	if h.bridge != "" {
		if out, err := runIP("link", "del", "dev", h.bridge); err != nil {
			t.Errorf("netHosts cleanup: %v: %s", err, out)
		}
	}
	for _, r := range h.rules {
		if out, err := exec.Command(r.tool, append([]string{"-w", "-D", "FORWARD"}, r.spec...)...).CombinedOutput(); err != nil {
			t.Errorf("netHosts cleanup: %s -D FORWARD %s: %v: %s", r.tool, strings.Join(r.spec, " "), err, out)
		}
	}
}

func (h *netHosts) mustIP(args ...string) {
	h.t.Helper()
	if out, err := runIP(args...); err != nil {
		h.t.Fatalf("newNetHosts: %v: %s", err, out)
	}
}

// runIP runs ip with args, returning its combined output.
func runIP(args ...string) (string, error) {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		err = fmt.Errorf("ip %s: %w", strings.Join(args, " "), err)
	}
	return string(out), err
}

// freePrefix picks a random 10.213.X.0/24 that no IPv4 address or route of
// the root namespace overlaps.
func freePrefix() (netip.Prefix, error) {
	addrs, err := runIP("-4", "-o", "addr", "show")
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%w: %s", err, addrs)
	}
	routes, err := runIP("-4", "route", "show", "table", "all")
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%w: %s", err, routes)
	}
	var used []netip.Prefix
	for _, f := range strings.Fields(addrs + "\n" + routes) {
		if p, err := netip.ParsePrefix(f); err == nil {
			used = append(used, p.Masked())
		} else if a, err := netip.ParseAddr(f); err == nil {
			used = append(used, netip.PrefixFrom(a, a.BitLen()))
		}
	}
	for range 100 {
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 213, byte(rand.IntN(256)), 0}), 24)
		free := true
		for _, u := range used {
			// 0.0.0.0/0 (a default route written as a prefix) would
			// overlap everything and means nothing here.
			if u.Bits() > 0 && u.Overlaps(p) {
				free = false
				break
			}
		}
		if free {
			return p, nil
		}
	}
	return netip.Prefix{}, errors.New("no free /24 in 10.213.0.0/16")
}

// The helper process of TestNetHosts: the test binary itself, run with
// -test.run=^TestNetHostsHelperProcess$ and netHelperEnv set to
//
//	serve IP TOKEN   listen on IP:0 and on 127.0.0.1 at the same port, print
//	                 the port, then greet every connection with
//	                 "nethosts TOKEN" and echo what it sends, until killed
//	dial ADDR TOKEN  connect to ADDR, expect the greeting, check the echo,
//	                 print "ok" (exit 0) or the error (exit 1)
const netHelperEnv = "QWENFLEET_NETHOSTS_HELPER"

func TestNetHostsHelperProcess(t *testing.T) {
	f := strings.Fields(os.Getenv(netHelperEnv))
	if len(f) == 0 {
		return // not the helper process
	}
	fail := func(err error) {
		fmt.Println(err)
		os.Exit(1)
	}
	if len(f) != 3 {
		fail(fmt.Errorf("%s=%q: want MODE ADDR TOKEN", netHelperEnv, os.Getenv(netHelperEnv)))
	}
	switch f[0] {
	case "serve":
		ln, err := net.Listen("tcp4", net.JoinHostPort(f[1], "0"))
		if err != nil {
			fail(err)
		}
		port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
		lo, err := net.Listen("tcp4", net.JoinHostPort("127.0.0.1", port))
		if err != nil {
			fail(err)
		}
		fmt.Println(port)
		go greetAndEcho(lo, f[2])
		greetAndEcho(ln, f[2])
		os.Exit(1)
	case "dial":
		c, err := helloConn(f[1], f[2], 3*time.Second)
		if err != nil {
			fail(err)
		}
		c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := io.WriteString(c, "ping\n"); err != nil {
			fail(err)
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || line != "ping\n" {
			fail(fmt.Errorf("echo: %q, %v", line, err))
		}
		fmt.Println("ok")
		os.Exit(0)
	}
	fail(fmt.Errorf("%s: unknown mode %q", netHelperEnv, f[0]))
}

// greetAndEcho serves ln until it fails: each connection gets the line
// "nethosts TOKEN", then its own bytes back.
func greetAndEcho(ln net.Listener, token string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			fmt.Fprintf(c, "nethosts %s\n", token)
			io.Copy(c, c)
		}()
	}
}

// helloConn connects to addr within timeout and reads the greeting of
// greetAndEcho with token (within timeout as well), so a connection that
// something else accepted does not count.
func helloConn(addr, token string, timeout time.Duration) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return nil, err
	}
	c.SetReadDeadline(time.Now().Add(timeout))
	// Byte by byte: nothing after the greeting may stay in a buffer.
	var line []byte
	b := make([]byte, 1)
	for len(line) < 100 {
		if _, err := c.Read(b); err != nil {
			c.Close()
			return nil, fmt.Errorf("%s: greeting: %w", addr, err)
		}
		if b[0] == '\n' {
			break
		}
		line = append(line, b[0])
	}
	if want := "nethosts " + token; string(line) != want {
		c.Close()
		return nil, fmt.Errorf("%s: greeting %q, want %q", addr, line, want)
	}
	c.SetReadDeadline(time.Time{})
	return c, nil
}

// netHelper returns the command of a helper process in host i.
func netHelper(h *netHosts, i int, mode, addr, token string) *exec.Cmd {
	cmd := h.Command(i, os.Args[0], "-test.run=^TestNetHostsHelperProcess$")
	// QWENFLEET_SKIP_E2E: its TestMain builds no binaries.
	cmd.Env = append(os.Environ(), "QWENFLEET_SKIP_E2E=1", netHelperEnv+"="+mode+" "+addr+" "+token)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return cmd
}

// dialFrom runs a dial helper in host i and fails t unless it reached addr.
func dialFrom(t *testing.T, h *netHosts, i int, addr, token string) {
	t.Helper()
	cmd := netHelper(h, i, "dial", addr, token)
	timer := time.AfterFunc(10*time.Second, func() { cmd.Process.Kill() })
	defer timer.Stop()
	out, err := cmd.CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "ok" {
		t.Fatalf("from host %d to %s: %v: %s", i, addr, err, out)
	}
}

func TestNetHosts(t *testing.T) {
	needE2E(t)
	t0 := time.Now()
	h := newNetHosts(t, 2)
	t.Logf("network of 2 hosts in %v: bridge %s at %s, hosts %s and %s",
		time.Since(t0).Round(time.Millisecond), h.bridge, h.HostIP(), h.IP(0), h.IP(1))
	token := strconv.FormatUint(rand.Uint64(), 16)

	// The server in host 0 (stopped before the network goes: a cleanup
	// registered after newNetHosts').
	srv := netHelper(h, 0, "serve", h.IP(0), token)
	stdout, err := srv.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	srv.Stderr = &stderr
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		srv.Process.Kill()
		srv.Wait()
	})
	portc := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		portc <- strings.TrimSpace(line)
	}()
	var port string
	select {
	case port = <-portc:
	case <-time.After(10 * time.Second):
	}
	if _, err := strconv.Atoi(port); err != nil {
		srv.Process.Kill()
		srv.Wait()
		t.Fatalf("server in host 0: port %q; stderr: %s", port, stderr.String())
	}
	addr0 := net.JoinHostPort(h.IP(0), port)

	// And one in the root namespace, on the bridge's address.
	ln, err := net.Listen("tcp4", net.JoinHostPort(h.HostIP(), "0"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go greetAndEcho(ln, token)

	// Reachable: host 0 from the root namespace and from host 1, the root
	// namespace from host 0, host 0's lo from host 0.
	t1 := time.Now()
	conn, err := helloConn(addr0, token, 2*time.Second)
	if err != nil {
		t.Fatal("from the root namespace:", err)
	}
	defer conn.Close()
	dialFrom(t, h, 1, addr0, token)
	dialFrom(t, h, 0, ln.Addr().String(), token)
	dialFrom(t, h, 0, net.JoinHostPort("127.0.0.1", port), token)
	t.Logf("reachability checks (3 helper processes) in %v", time.Since(t1).Round(time.Millisecond))

	// Not reachable: host 0's 127.0.0.1 from the root namespace (which is
	// the root namespace's own loopback).
	if c, err := helloConn(net.JoinHostPort("127.0.0.1", port), token, 500*time.Millisecond); err == nil {
		c.Close()
		t.Fatal("host 0's 127.0.0.1 is reachable from the root namespace")
	}

	// Cut: a connect times out, not refused; the open connection's data
	// waits.
	t2 := time.Now()
	h.Cut(0)
	t.Logf("Cut in %v", time.Since(t2).Round(time.Millisecond))
	tw := time.Now()
	if _, err := io.WriteString(conn, "during the cut\n"); err != nil {
		t.Fatal("write on the open connection during the cut:", err)
	}
	t3 := time.Now()
	if c, err := net.DialTimeout("tcp", addr0, time.Second); err == nil {
		c.Close()
		t.Fatal("host 0 reachable after Cut")
	} else if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		t.Fatalf("connect to host 0 after Cut: %v, want a timeout", err)
	} else {
		t.Logf("connect after Cut: %v after %v", err, time.Since(t3).Round(time.Millisecond))
	}

	// Heal: a new connection works, the open one gets its echo.
	t4 := time.Now()
	h.Heal(0)
	t.Logf("Heal in %v", time.Since(t4).Round(time.Millisecond))
	c, err := helloConn(addr0, token, 2*time.Second)
	if err != nil {
		t.Fatal("after Heal:", err)
	}
	c.Close()
	conn.SetReadDeadline(time.Now().Add(8 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil || line != "during the cut\n" {
		t.Fatalf("open connection after Heal: %q, %v", line, err)
	}
	t.Logf("open connection: echo %v after the write (%v after Heal)",
		time.Since(tw).Round(time.Millisecond), time.Since(t4).Round(time.Millisecond))
	dialFrom(t, h, 1, addr0, token)
}
