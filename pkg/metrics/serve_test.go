package metrics

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/qwenfleet/qwenfleet/pkg/security"
)

// warnings counts the Warn records logged through it.
type warnings struct {
	mu    sync.Mutex
	lines []string
}

func (w *warnings) Enabled(context.Context, slog.Level) bool { return true }
func (w *warnings) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Message)
	r.Attrs(func(a slog.Attr) bool {
		b.WriteString(" " + a.Key + "=" + a.Value.String())
		return true
	})
	w.mu.Lock()
	w.lines = append(w.lines, b.String())
	w.mu.Unlock()
	return nil
}
func (w *warnings) WithAttrs([]slog.Attr) slog.Handler { return w }
func (w *warnings) WithGroup(string) slog.Handler      { return w }

func (w *warnings) get() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]string(nil), w.lines...)
}

func scrape(url string, cfg *tls.Config) (string, error) {
	tr := &http.Transport{TLSClientConfig: cfg, DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		return string(b), &httpError{resp.Status}
	}
	return string(b), err
}

type httpError struct{ status string }

func (e *httpError) Error() string { return e.status }

func caPool(t *testing.T, dir string) *x509.CertPool {
	t.Helper()
	p, err := security.LoadCAPool(filepath.Join(dir, security.CAFile))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestServeTLS: with TLS.ServerConfig(true) a scraper with client.pem gets
// the metrics; one without a certificate, one speaking plaintext HTTP and
// one with another CA's client certificate (trusting the server) get
// nothing, and the refusal of their host is logged once.
func TestServeTLS(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	other := filepath.Join(t.TempDir(), "tls")
	for _, d := range []string{dir, other} {
		if err := security.WriteCerts(d, nil, false); err != nil {
			t.Fatal(err)
		}
	}
	srvTLS, err := security.NewTLS(dir, security.RoleCoordinator)
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	ctr := prometheus.NewCounter(prometheus.CounterOpts{Name: Prefix + "test_total", Help: "A test counter."})
	reg.MustRegister(ctr)
	ctr.Add(3)
	w := &warnings{}
	addr, stop, err := ServeTLS("127.0.0.1:0", reg, srvTLS.ServerConfig(true), security.NewRefusals(slog.New(w)))
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	url := "https://" + addr + "/metrics"

	cli, err := security.NewTLS(dir, security.RoleClient)
	if err != nil {
		t.Fatal(err)
	}
	body, err := scrape(url, cli.ClientConfig(""))
	if err != nil || !strings.Contains(body, "qwenfleet:test_total 3") {
		t.Fatalf("scrape with client.pem: %v\n%.300s", err, body)
	}

	pool := caPool(t, dir)
	otherPair, err := tls.LoadX509KeyPair(filepath.Join(other, "client.pem"), filepath.Join(other, "client-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		what, url string
		cfg       *tls.Config
	}{
		{"no client certificate", url, &tls.Config{RootCAs: pool}},
		{"plaintext http", "http://" + addr + "/metrics", nil},
		{"another CA's client certificate", url, &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{otherPair}}},
	} {
		for range 2 {
			if body, err := scrape(c.url, c.cfg); err == nil || strings.Contains(body, "test_total") {
				t.Errorf("%s: scraped (err %v)", c.what, err)
			}
		}
	}
	// Every refused client is 127.0.0.1: one line.
	deadline := time.Now().Add(3 * time.Second)
	for len(w.get()) == 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	if lines := w.get(); len(lines) != 1 || !strings.Contains(lines[0], "listener=metrics") || !strings.Contains(lines[0], "remote=127.0.0.1:") {
		t.Errorf("logged %q, want one refusal of 127.0.0.1 on metrics", lines)
	}

	// The plaintext Serve still serves plaintext.
	paddr, pstop, err := Serve("127.0.0.1:0", reg)
	if err != nil {
		t.Fatal(err)
	}
	defer pstop()
	if body, err := scrape("http://"+paddr+"/metrics", nil); err != nil || !strings.Contains(body, "qwenfleet:test_total 3") {
		t.Errorf("plaintext Serve: %v", err)
	}
	if _, _, err := ServeTLS("127.0.0.1:0", reg, nil, nil); err == nil {
		t.Error("ServeTLS without a configuration accepted")
	}
}
