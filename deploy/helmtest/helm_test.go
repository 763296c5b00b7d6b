package helmtest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// repoRoot is the module's root (this package is deploy/helmtest).
func repoRoot(t testing.TB) string {
	t.Helper()
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatalf("no go.mod at %s: %v", root, err)
	}
	return root
}

func chartDir(t testing.TB) string { return filepath.Join(repoRoot(t), "helm", "qwenfleet") }

var (
	helmOnce sync.Once
	helmPath string
	helmWhy  string // why there is no helm
)

// helm returns .bin/helm, installing it with scripts/install-helm.sh on first use (a
// build from source: minutes the first time). It skips the test, saying why, when helm
// is missing and cannot be installed (no module proxy, no network).
func helm(t testing.TB) string {
	t.Helper()
	helmOnce.Do(func() {
		root := repoRoot(t)
		bin := filepath.Join(root, ".bin", "helm")
		if fi, err := os.Stat(bin); err == nil && fi.Mode()&0o111 != 0 {
			helmPath = bin
			return
		}
		script := filepath.Join(root, "scripts", "install-helm.sh")
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, script)
		cmd.Dir = root
		out, err := cmd.CombinedOutput()
		if err != nil {
			helmWhy = fmt.Sprintf("no .bin/helm, and scripts/install-helm.sh failed (%v): %s", err, lastLines(string(out), 5))
			return
		}
		helmPath = bin
	})
	if helmPath == "" {
		t.Skip(helmWhy)
	}
	return helmPath
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// runHelm runs helm with args in the repository root and returns its stdout.
func runHelm(t testing.TB, args ...string) (string, error) {
	t.Helper()
	h := helm(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, h, args...)
	cmd.Dir = repoRoot(t)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("helm %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// presets are the chart's presets/*.yaml, by name.
func presets(t testing.TB) map[string]string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(chartDir(t), "presets", "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, f := range files {
		out[strings.TrimSuffix(filepath.Base(f), ".yaml")] = f
	}
	return out
}

// Object is one rendered manifest: its kind, name and typed value.
type Object struct {
	APIVersion, Kind, Name, Namespace string
	Source                            string // the template it came from
	Value                             any    // *appsv1.Deployment, *ServiceMonitor, ...
}

func (o Object) String() string { return o.Kind + "/" + o.Name + " (" + o.Source + ")" }

// Manifests is a rendered release.
type Manifests struct {
	Objects []Object
	Raw     string
}

// Render runs helm template for release name in namespace with the values files and
// --set arguments given, and decodes every manifest strictly.
func Render(t testing.TB, release, namespace string, args ...string) Manifests {
	t.Helper()
	m, err := RenderErr(t, release, namespace, args...)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// RenderErr is Render returning helm's or the decoder's error.
func RenderErr(t testing.TB, release, namespace string, args ...string) (Manifests, error) {
	t.Helper()
	out, err := runHelm(t, append([]string{"template", release, chartDir(t), "--namespace", namespace}, args...)...)
	if err != nil {
		return Manifests{}, err
	}
	objs, err := Decode(out)
	if err != nil {
		return Manifests{}, err
	}
	return Manifests{Objects: objs, Raw: out}, nil
}

var docSep = regexp.MustCompile(`(?m)^---[ \t]*$`)
var sourceLine = regexp.MustCompile(`(?m)^# Source: (\S+)`)

// Decode splits a rendered stream on --- and decodes each document strictly into the
// type of its apiVersion and kind: an unknown field, a wrong type or an unknown kind is
// an error naming the template.
func Decode(stream string) ([]Object, error) {
	var objs []Object
	for _, doc := range docSep.Split(stream, -1) {
		if strings.TrimSpace(stripComments(doc)) == "" {
			continue
		}
		src := "?"
		if m := sourceLine.FindStringSubmatch(doc); m != nil {
			src = m[1]
		}
		var tm struct {
			metav1.TypeMeta `json:",inline"`
			Metadata        struct {
				Name      string `json:"name"`
				Namespace string `json:"namespace"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
			return nil, fmt.Errorf("%s: %v", src, err)
		}
		v, ok := newTyped(tm.APIVersion, tm.Kind)
		if !ok {
			return nil, fmt.Errorf("%s: %s %s is not a kind this test knows: add it to newTyped", src, tm.APIVersion, tm.Kind)
		}
		if err := yaml.UnmarshalStrict([]byte(doc), v); err != nil {
			return nil, fmt.Errorf("%s: %s %s: %v", src, tm.Kind, tm.Metadata.Name, err)
		}
		objs = append(objs, Object{APIVersion: tm.APIVersion, Kind: tm.Kind, Name: tm.Metadata.Name, Namespace: tm.Metadata.Namespace, Source: src, Value: v})
	}
	return objs, nil
}

func stripComments(doc string) string {
	var b strings.Builder
	for _, l := range strings.Split(doc, "\n") {
		if strings.HasPrefix(strings.TrimSpace(l), "#") {
			continue
		}
		b.WriteString(l)
		b.WriteByte('\n')
	}
	return b.String()
}

func newTyped(apiVersion, kind string) (any, bool) {
	switch apiVersion + " " + kind {
	case "v1 Service":
		return &corev1.Service{}, true
	case "v1 Secret":
		return &corev1.Secret{}, true
	case "v1 ConfigMap":
		return &corev1.ConfigMap{}, true
	case "v1 ServiceAccount":
		return &corev1.ServiceAccount{}, true
	case "v1 PersistentVolumeClaim":
		return &corev1.PersistentVolumeClaim{}, true
	case "apps/v1 Deployment":
		return &appsv1.Deployment{}, true
	case "apps/v1 StatefulSet":
		return &appsv1.StatefulSet{}, true
	case "policy/v1 PodDisruptionBudget":
		return &policyv1.PodDisruptionBudget{}, true
	case "networking.k8s.io/v1 NetworkPolicy":
		return &networkingv1.NetworkPolicy{}, true
	// CRDs: no Go types here; structs of the fields the chart uses, from the CRDs'
	// schemas (prometheus-operator v0.8x, cert-manager v1.x), decoded strictly.
	case "monitoring.coreos.com/v1 ServiceMonitor":
		return &ServiceMonitor{}, true
	case "cert-manager.io/v1 Certificate":
		return &Certificate{}, true
	}
	return nil, false
}

// ServiceMonitor is the part of prometheus-operator's ServiceMonitor the chart writes.
type ServiceMonitor struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		Selector          metav1.LabelSelector `json:"selector"`
		NamespaceSelector struct {
			MatchNames []string `json:"matchNames,omitempty"`
			Any        bool     `json:"any,omitempty"`
		} `json:"namespaceSelector"`
		Endpoints []struct {
			Port      string `json:"port"`
			Path      string `json:"path,omitempty"`
			Scheme    string `json:"scheme,omitempty"`
			Interval  string `json:"interval,omitempty"`
			TLSConfig *struct {
				ServerName string        `json:"serverName,omitempty"`
				CA         *secretOrCM   `json:"ca,omitempty"`
				Cert       *secretOrCM   `json:"cert,omitempty"`
				KeySecret  *secretKeyRef `json:"keySecret,omitempty"`
			} `json:"tlsConfig,omitempty"`
		} `json:"endpoints"`
	} `json:"spec"`
}

type secretKeyRef struct {
	Name string `json:"name"`
	Key  string `json:"key"`
}

type secretOrCM struct {
	Secret    *secretKeyRef `json:"secret,omitempty"`
	ConfigMap *secretKeyRef `json:"configMap,omitempty"`
}

// Certificate is the part of cert-manager's Certificate the chart writes.
type Certificate struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		SecretName string `json:"secretName"`
		CommonName string `json:"commonName,omitempty"`
		Subject    *struct {
			Organizations       []string `json:"organizations,omitempty"`
			OrganizationalUnits []string `json:"organizationalUnits,omitempty"`
		} `json:"subject,omitempty"`
		Duration    string `json:"duration,omitempty"`
		RenewBefore string `json:"renewBefore,omitempty"`
		PrivateKey  *struct {
			Algorithm      string `json:"algorithm,omitempty"`
			Size           int    `json:"size,omitempty"`
			Encoding       string `json:"encoding,omitempty"`
			RotationPolicy string `json:"rotationPolicy,omitempty"`
		} `json:"privateKey,omitempty"`
		Usages      []string `json:"usages,omitempty"`
		DNSNames    []string `json:"dnsNames,omitempty"`
		IPAddresses []string `json:"ipAddresses,omitempty"`
		URIs        []string `json:"uris,omitempty"`
		IssuerRef   struct {
			Name  string `json:"name"`
			Kind  string `json:"kind,omitempty"`
			Group string `json:"group,omitempty"`
		} `json:"issuerRef"`
	} `json:"spec"`
}

// Of returns the objects of one kind, typed.
func Of[T any](m Manifests) []*T {
	var out []*T
	for _, o := range m.Objects {
		if v, ok := o.Value.(*T); ok {
			out = append(out, v)
		}
	}
	return out
}

func kinds(m Manifests) []string {
	seen := map[string]int{}
	for _, o := range m.Objects {
		seen[o.Kind]++
	}
	var out []string
	for k, n := range seen {
		out = append(out, fmt.Sprintf("%s×%d", k, n))
	}
	sort.Strings(out)
	return out
}

// Notes renders NOTES.txt (helm install --dry-run=client: no cluster is asked).
func Notes(t testing.TB, release, namespace string, args ...string) string {
	t.Helper()
	out, err := runHelm(t, append([]string{"install", release, chartDir(t), "--namespace", namespace, "--dry-run=client"}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	_, notes, ok := strings.Cut(out, "\nNOTES:\n")
	if !ok {
		t.Fatalf("helm install --dry-run printed no NOTES")
	}
	return notes
}

// FirstCall is the pod of NOTES.txt's first Generate call (kubectl run --overrides),
// with the shell's '"$KEY"' replaced by key, decoded strictly.
func FirstCall(t testing.TB, notes, key string) *corev1.Pod {
	t.Helper()
	_, rest, ok := strings.Cut(notes, "--overrides='")
	if !ok {
		t.Fatalf("NOTES.txt has no kubectl run --overrides:\n%s", notes)
	}
	rest = strings.ReplaceAll(rest, `'"$KEY"'`, key)
	js, _, ok := strings.Cut(rest, "'")
	if !ok {
		t.Fatalf("NOTES.txt: --overrides' quote does not end")
	}
	var pod corev1.Pod
	if err := yaml.UnmarshalStrict([]byte(js), &pod); err != nil {
		t.Fatalf("NOTES.txt --overrides is not a Pod: %v\n%s", err, js)
	}
	return &pod
}
