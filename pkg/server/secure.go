package server

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/qwenfleet/qwenfleet/pkg/cluster"
	"github.com/qwenfleet/qwenfleet/pkg/metrics"
	"github.com/qwenfleet/qwenfleet/pkg/security"
)

// Security is a process's transport security, from its flags. With TLSDir
// every listener serves TLS with the pair of the process's role from that
// directory (certificates from `qwenctl certs`), internal listeners require
// a client certificate of the cluster CA, and the gossip key is the
// directory's gossip.key. Without it the process serves plaintext, which
// CheckListeners allows only on loopback unless Insecure is set on purpose.
type Security struct {
	TLSDir   string
	Insecure bool
	// Etcd is how the process authenticates to an external etcd.
	Etcd EtcdAuth
}

// EtcdAuth is a client's authentication to etcd: TLS (https:// endpoints)
// with CAFile/CertFile/KeyFile when given, else with the TLS dir's ca.pem
// and the process's pair; Username and Password for etcd's own auth.
type EtcdAuth struct {
	CAFile, CertFile, KeyFile string
	Username, Password        string
}

// Mode is what GetServerInfo and the start-up log say of it: "tls",
// "insecure" (plaintext on purpose, beyond loopback or not) or
// "plaintext-loopback" (no TLS, every listener on loopback).
func (s Security) Mode() string {
	switch {
	case s.TLSDir != "":
		return "tls"
	case s.Insecure:
		return "insecure"
	}
	return "plaintext-loopback"
}

// securityFlags registers the security flags shared by both commands.
func securityFlags(fs *flag.FlagSet) func() (Security, error) {
	tlsDir := fs.String("tls-dir", "", "directory of the cluster's certificates (`qwenctl certs --out DIR`): TLS on every listener, client certificates on internal ones, encrypted gossip")
	insecure := fs.Bool("insecure", false, "serve plaintext and unauthenticated beyond loopback, on purpose (without it, a listener beyond loopback needs --tls-dir)")
	ca := fs.String("etcd-cacert", "", "CA of an external etcd's server certificate (default with https:// endpoints: --tls-dir's ca.pem)")
	cert := fs.String("etcd-cert", "", "client certificate for an external etcd (default with https:// endpoints: --tls-dir's pair of this role)")
	key := fs.String("etcd-key", "", "key of --etcd-cert")
	user := fs.String("etcd-username", "", "etcd user (etcd's own authentication); the password is read from --etcd-password-file or $QWENFLEET_ETCD_PASSWORD")
	passFile := fs.String("etcd-password-file", "", "file holding the etcd user's password")
	return func() (Security, error) {
		s := Security{TLSDir: *tlsDir, Insecure: *insecure, Etcd: EtcdAuth{CAFile: *ca, CertFile: *cert, KeyFile: *key, Username: *user}}
		if s.TLSDir != "" && s.Insecure {
			return s, errors.New("--insecure: given with --tls-dir; pick one")
		}
		if s.TLSDir != "" {
			if fi, err := os.Stat(s.TLSDir); err != nil || !fi.IsDir() {
				return s, fmt.Errorf("--tls-dir: %s is not a directory (make one with `qwenctl certs --out %s`)", s.TLSDir, s.TLSDir)
			}
		}
		if (*cert == "") != (*key == "") {
			return s, errors.New("--etcd-cert and --etcd-key: give both or neither")
		}
		switch {
		case *passFile != "":
			b, err := os.ReadFile(*passFile)
			if err != nil {
				return s, fmt.Errorf("--etcd-password-file: %w", err)
			}
			s.Etcd.Password = strings.TrimRight(string(b), "\r\n")
		default:
			s.Etcd.Password = os.Getenv("QWENFLEET_ETCD_PASSWORD")
		}
		if s.Etcd.Password != "" && s.Etcd.Username == "" {
			return s, errors.New("--etcd-username: needed with an etcd password")
		}
		return s, nil
	}
}

// etcdTLS is the TLS configuration for the etcd endpoints: nil for http://
// ones (all must agree), from EtcdAuth's files when given, else from the
// process's role in the TLS dir (which follows rotation).
func (s Security) etcdTLS(endpoints []string, own *security.TLS) (*tls.Config, error) {
	https := 0
	for _, e := range endpoints {
		if strings.HasPrefix(e, "https://") {
			https++
		}
	}
	switch {
	case https == 0:
		for _, e := range endpoints {
			if host := strings.TrimPrefix(e, "http://"); !s.Insecure && !security.IsLoopback(host) {
				return nil, fmt.Errorf("--etcd-endpoints: %s is plaintext beyond loopback (the placement and the election would cross the network in the clear): use an https:// etcd, or --insecure on purpose", e)
			}
		}
		return nil, nil
	case https != len(endpoints):
		return nil, fmt.Errorf("--etcd-endpoints: %s mixes http:// and https://", strings.Join(endpoints, ","))
	}
	if s.Etcd.CAFile == "" && s.Etcd.CertFile == "" {
		if own == nil {
			return nil, errors.New("--etcd-endpoints: https:// endpoints need --tls-dir, or --etcd-cacert (and --etcd-cert/--etcd-key for client certificates)")
		}
		return own.ClientConfig(""), nil
	}
	if own != nil && (s.Etcd.CAFile == "" || s.Etcd.CertFile == "") {
		// One of them given: the other from the TLS dir, as the flags
		// say (the cluster CA, or this role's pair).
		cfg := own.ClientConfig("")
		if s.Etcd.CAFile != "" {
			pool, err := security.LoadCAPool(s.Etcd.CAFile)
			if err != nil {
				return nil, fmt.Errorf("--etcd-cacert: %w", err)
			}
			cfg = &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool, GetClientCertificate: cfg.GetClientCertificate}
		} else {
			pair, err := tls.LoadX509KeyPair(s.Etcd.CertFile, s.Etcd.KeyFile)
			if err != nil {
				return nil, fmt.Errorf("--etcd-cert/--etcd-key: %w", err)
			}
			cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &pair, nil }
		}
		return cfg, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if s.Etcd.CAFile != "" {
		pool, err := security.LoadCAPool(s.Etcd.CAFile)
		if err != nil {
			return nil, fmt.Errorf("--etcd-cacert: %w", err)
		}
		cfg.RootCAs = pool
	}
	if s.Etcd.CertFile != "" {
		pair, err := tls.LoadX509KeyPair(s.Etcd.CertFile, s.Etcd.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("--etcd-cert/--etcd-key: %w", err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}

// processTLS is what a process made of its Security: its role's
// certificates (nil without --tls-dir) and where its listeners' refusals
// are logged.
type processTLS struct {
	sec      Security
	own      *security.TLS
	refusals *security.Refusals
	log      *slog.Logger
}

// open reads the TLS dir's files of role (none without --tls-dir) and
// logs the process's security mode.
func (s Security) open(role security.Role, log *slog.Logger) (*processTLS, error) {
	p := &processTLS{sec: s, log: log, refusals: security.NewRefusals(log)}
	switch {
	case s.TLSDir != "":
		own, err := security.NewTLS(s.TLSDir, role)
		if err != nil {
			return nil, fmt.Errorf("--tls-dir: %w", err)
		}
		if _, err := os.Stat(filepath.Join(s.TLSDir, security.GossipKeyFile)); err != nil {
			return nil, fmt.Errorf("--tls-dir: no %s (`qwenctl certs` writes it): %w", security.GossipKeyFile, err)
		}
		p.own = own
		log.Info("security: TLS on every listener", "tls_dir", s.TLSDir, "role", string(role))
	case s.Insecure:
		log.Warn("security: --insecure: every listener is plaintext and unauthenticated; anyone who reaches them can read prompts and drive the cluster")
	}
	return p, nil
}

// serverOption is the gRPC transport credentials of a listener: TLS with
// the role's pair (client certificates required for internal ones), its
// refusals logged; none (plaintext) without TLS.
func (p *processTLS) serverOptions(listener string, requireClientCert bool) []grpc.ServerOption {
	if p.own == nil {
		return nil
	}
	return []grpc.ServerOption{grpc.Creds(security.ServerCredentials(p.own.ServerConfig(requireClientCert), listener, p.refusals))}
}

// dialCreds are the credentials of this process's calls to the cluster's
// servers: the role's pair, the server verified against the cluster CA.
func (p *processTLS) dialCreds() credentials.TransportCredentials {
	if p.own == nil {
		return insecure.NewCredentials()
	}
	return security.ClientCredentials(p.own.ClientConfig(""))
}

// serveMetrics serves /metrics on addr: HTTPS requiring a client
// certificate of the cluster CA with TLS, plain HTTP without.
func (p *processTLS) serveMetrics(addr string, reg *prometheus.Registry) (string, func(), error) {
	if p.own == nil {
		a, stop, err := metrics.Serve(addr, reg)
		if err == nil {
			p.log.Info("metrics", "addr", "http://"+a+"/metrics")
		}
		return a, stop, err
	}
	a, stop, err := metrics.ServeTLS(addr, reg, p.own.ServerConfig(true), p.refusals)
	if err == nil {
		p.log.Info("metrics (client certificate of the cluster CA required)", "addr", "https://"+a+"/metrics")
	}
	return a, stop, err
}

// gossipKeyFile is the gossip key of the TLS dir ("" without TLS).
func (p *processTLS) gossipKeyFile() string {
	if p.own == nil {
		return ""
	}
	return filepath.Join(p.sec.TLSDir, security.GossipKeyFile)
}

// etcdConfig is how this process connects to etcd at endpoints.
func (p *processTLS) etcdConfig(endpoints []string) (cluster.ConnectConfig, error) {
	t, err := p.sec.etcdTLS(endpoints, p.own)
	if err != nil {
		return cluster.ConnectConfig{}, err
	}
	return cluster.ConnectConfig{TLS: t, Username: p.sec.Etcd.Username, Password: p.sec.Etcd.Password}, nil
}

// workerArgs are the security flags local workers get from their
// coordinator (the etcd password travels in their environment).
func (s Security) workerArgs() []string {
	var a []string
	switch {
	case s.TLSDir != "":
		a = append(a, "--tls-dir", s.TLSDir)
	case s.Insecure:
		a = append(a, "--insecure")
	}
	for _, f := range [][2]string{{"--etcd-cacert", s.Etcd.CAFile}, {"--etcd-cert", s.Etcd.CertFile}, {"--etcd-key", s.Etcd.KeyFile}, {"--etcd-username", s.Etcd.Username}} {
		if f[1] != "" {
			a = append(a, f[0], f[1])
		}
	}
	return a
}

// gossipKeyPoll is how often a process checks its gossip key file for a
// rotation.
const gossipKeyPoll = 2 * time.Second

// watchReloads logs, once per change, whether files that are re-read when
// they change (certificates, API keys) failed to load: the previous set
// stays in use meanwhile, so a revocation whose file does not load would
// otherwise go unnoticed. It polls errf every 5 s until ctx ends.
func watchReloads(ctx context.Context, log *slog.Logger, what string, errf func() error) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	last := ""
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := ""
		if err := errf(); err != nil {
			now = err.Error()
		}
		switch {
		case now == last:
		case now != "":
			log.Error(what+" no longer load: the previous ones stay in use until they do", "err", now)
		default:
			log.Info(what + " load again")
		}
		last = now
	}
}
