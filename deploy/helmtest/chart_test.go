package helmtest

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/security"
	"github.com/qwenfleet/qwenfleet/pkg/server"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"
)

const (
	testRelease   = "qf"
	testNamespace = "serving"
)

func TestLint(t *testing.T) {
	if out, err := runHelm(t, "lint", "--strict", chartDir(t)); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for name, file := range presets(t) {
		if out, err := runHelm(t, "lint", "--strict", chartDir(t), "-f", file); err != nil {
			t.Errorf("preset %s: %v\n%s", name, err, out)
		}
	}
}

// presetWant is what a preset must render beyond the common checks.
type presetWant struct {
	gpus      int    // nvidia.com/gpu per worker
	device    string // --device
	flag      string // a coordinator flag, e.g. --tp=8
	group     int    // worker pods per replica: replicas must be a multiple
	mkmodel   bool
	etcdClaim bool // etcd on PVCs
}

var presetWants = map[string]presetWant{
	"qwen2-72b":      {gpus: 1, device: "cuda:0", flag: "--tp=8", group: 8, etcdClaim: true},
	"qwen2-57b-a14b": {gpus: 1, device: "cuda:0", flag: "--ep=4", group: 4, etcdClaim: true},
	"qwen2-7b":       {gpus: 1, device: "cuda:0", flag: "--tp=1", group: 1, etcdClaim: true},
	"cpu-demo":       {gpus: 0, device: "cpu", flag: "--tp=1", group: 1, mkmodel: true},
}

func TestPresets(t *testing.T) {
	ps := presets(t)
	for name := range presetWants {
		if _, ok := ps[name]; !ok {
			t.Errorf("no preset %s.yaml in %s", name, filepath.Join(chartDir(t), "presets"))
		}
	}
	for name, file := range ps {
		t.Run(name, func(t *testing.T) {
			want, ok := presetWants[name]
			if !ok {
				t.Fatalf("preset %s has no expectations in presetWants", name)
			}
			m := Render(t, testRelease, testNamespace, "-f", file)
			t.Logf("%s: %s", name, strings.Join(kinds(m), " "))
			checkRelease(t, m, testNamespace)
			w := workload(t, m, "worker")
			c := container(t, w.spec, "worker")
			if got := c.Resources.Limits[corev1.ResourceName("nvidia.com/gpu")]; int(got.Value()) != want.gpus {
				t.Errorf("worker nvidia.com/gpu limit %v, want %d", got.String(), want.gpus)
			}
			if got := c.Resources.Requests[corev1.ResourceName("nvidia.com/gpu")]; int(got.Value()) != want.gpus {
				t.Errorf("worker nvidia.com/gpu request %v, want %d", got.String(), want.gpus)
			}
			if got := flagValue(c.Args, "--device"); got != want.device {
				t.Errorf("worker --device=%s, want %s", got, want.device)
			}
			if want.gpus > 0 && len(w.spec.Tolerations) == 0 && len(w.spec.NodeSelector) == 0 {
				t.Errorf("GPU workers with neither tolerations nor a nodeSelector")
			}
			coord := container(t, workload(t, m, "coordinator").spec, "coordinator")
			if !contains(coord.Args, want.flag) {
				t.Errorf("coordinator args %v lack %s", coord.Args, want.flag)
			}
			if n := int(*w.replicas); n%want.group != 0 || n == 0 {
				t.Errorf("worker replicas %d: not a multiple of a replica's %d workers", n, want.group)
			}
			init := initContainer(w.spec, "mkmodel")
			if want.mkmodel != (init != nil) {
				t.Errorf("mkmodel init container: %v, want %v", init != nil, want.mkmodel)
			}
			if init != nil {
				// An init container runs again over the volume it filled when the pod's
				// sandbox is remade: it must leave the model there alone.
				if !contains(init.Args, "--if-missing") {
					t.Errorf("mkmodel init container args %v lack --if-missing", init.Args)
				}
				model := flagValue(coord.Args, "--model")
				if got := flagValue(init.Args, "--out"); got != model {
					t.Errorf("mkmodel --out=%s, coordinator --model=%s", got, model)
				}
				if !strings.HasPrefix(model, flagValue(c.Args, "--model-root")+"/") {
					t.Errorf("--model=%s is not under the workers' --model-root=%s", model, flagValue(c.Args, "--model-root"))
				}
			}
			if e := findWorkload(m, "etcd"); e != nil && want.etcdClaim != (len(e.sts.Spec.VolumeClaimTemplates) > 0) {
				t.Errorf("etcd on claims: %v, want %v", len(e.sts.Spec.VolumeClaimTemplates) > 0, want.etcdClaim)
			}
		})
	}
}

// TestVariants renders the values the presets do not use: cert-manager, the
// ServiceMonitor and dashboard, an external etcd with its own credentials, certificates
// from files, a hostPath model, a model claim made by the chart.
func TestVariants(t *testing.T) {
	certs := writeTestCerts(t, []string{"example.test"})
	for _, v := range []struct {
		name string
		args []string
		want []string // kinds that must be there
		test func(t *testing.T, m Manifests)
	}{
		{name: "cert-manager, monitoring", args: []string{"--set", "tls.source=certManager", "--set", "tls.certManager.issuerRef.name=qwenfleet-ca",
			"--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.dashboard.enabled=true"},
			want: []string{"Certificate", "ServiceMonitor", "ConfigMap"}, test: checkCertManager},
		{name: "external etcd", args: []string{"--set", "etcd.bundled=false", "--set", "etcd.external.endpoints={https://etcd-a.example:2379,https://etcd-b.example:2379}",
			"--set", "etcd.external.tlsSecretName=etcd-client", "--set", "etcd.external.username=qwenfleet", "--set", "etcd.external.passwordSecret.name=etcd-password",
			"--set", "model.volume.kind=hostPath"}, test: func(t *testing.T, m Manifests) {
			if findWorkload(m, "etcd") != nil {
				t.Errorf("an etcd StatefulSet with etcd.bundled=false")
			}
			c := container(t, workload(t, m, "worker").spec, "worker")
			for _, f := range []string{"--etcd-endpoints=https://etcd-a.example:2379,https://etcd-b.example:2379", "--etcd-cacert=/etc/qwenfleet/etcd-client/ca.crt",
				"--etcd-username=qwenfleet", "--etcd-password-file=/etc/qwenfleet/etcd-password/password"} {
				if !contains(c.Args, f) {
					t.Errorf("worker args lack %s", f)
				}
			}
		}},
		{name: "certificates and API keys from files", args: append(certFileArgs(certs), "--set-file", "apiKeys.file="+filepath.Join(certs, "keys.jsonl"),
			"--set", "model.volume.pvc.create=true", "--set", "model.volume.pvc.existingClaim="),
			want: []string{"Secret", "PersistentVolumeClaim"}, test: func(t *testing.T, m Manifests) {
				for _, s := range Of[corev1.Secret](m) {
					if _, ok := s.Data[security.CAKeyFile]; ok {
						t.Errorf("Secret %s holds the CA's key", s.Name)
					}
					if s.Name == testRelease+"-qwenfleet-tls" {
						want, _ := os.ReadFile(filepath.Join(certs, "worker-key.pem"))
						if !bytes.Equal(s.Data["worker-key.pem"], want) {
							t.Errorf("Secret %s worker-key.pem differs from the file given", s.Name)
						}
					}
				}
			}},
	} {
		t.Run(v.name, func(t *testing.T) {
			m := Render(t, testRelease, testNamespace, v.args...)
			checkRelease(t, m, testNamespace)
			have := map[string]bool{}
			for _, o := range m.Objects {
				have[o.Kind] = true
			}
			for _, k := range v.want {
				if !have[k] {
					t.Errorf("no %s rendered (%s)", k, strings.Join(kinds(m), " "))
				}
			}
			if v.test != nil {
				v.test(t, m)
			}
		})
	}
}

// TestBadValues: values that cannot work fail the render, saying why.
func TestBadValues(t *testing.T) {
	for _, v := range []struct {
		args []string
		want string
	}{
		{[]string{"--set", "etcd.replicas=2"}, "odd number of members"},
		{[]string{"--set", "worker.drainTimeoutSeconds=60", "--set", "worker.terminationGracePeriodSeconds=70"}, "must exceed worker.drainTimeoutSeconds + 15"},
		{[]string{"--set", "tls.source=certManager"}, "issuerRef.name"},
		{[]string{"--set", "tls.source=vault"}, "not secret, files or certManager"},
		{[]string{"--set", "tls.source=files"}, "tls.files.ca is empty"},
		{[]string{"--set", "etcd.bundled=false"}, "etcd.external.endpoints"},
		{[]string{"--set", "model.mkmodel.enabled=true"}, "needs model.volume.kind emptyDir"},
		{[]string{"--set", "gossipPort=0"}, "gossipPort: 0 is not a port"},
		{[]string{"--set", "gossipPort=70000"}, "gossipPort: 70000 is not a port"},
	} {
		if _, err := RenderErr(t, testRelease, testNamespace, v.args...); err == nil || !strings.Contains(err.Error(), v.want) {
			t.Errorf("helm template %v: %v, want an error saying %q", v.args, err, v.want)
		}
	}
}

// TestDashboardCopy: the chart's dashboard is deploy/grafana's (helm reads no file outside
// the chart, so it holds a copy).
func TestDashboardCopy(t *testing.T) {
	a, err := os.ReadFile(filepath.Join(repoRoot(t), "deploy", "grafana", "qwenfleet-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(chartDir(t), "dashboards", "qwenfleet-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Fatalf("helm/qwenfleet/dashboards/qwenfleet-dashboard.json differs from deploy/grafana/qwenfleet-dashboard.json: copy it again")
	}
}

// TestCertificateNames: the names the chart says certificates must hold are accepted by
// qwenctl certs (wildcards included), and a certificate made with them verifies every
// name a part dials: the coordinator Service, each worker's --advertise, each etcd
// endpoint and peer URL.
func TestCertificateNames(t *testing.T) {
	m := Render(t, testRelease, testNamespace, "--set", "tls.source=certManager", "--set", "tls.certManager.issuerRef.name=ca")
	hosts := chartCertHosts(t, m)
	dir := t.TempDir()
	if err := security.WriteCerts(dir, hosts, false); err != nil {
		t.Fatalf("qwenctl certs --hosts %s: %v", strings.Join(hosts, ","), err)
	}
	for _, role := range []string{"coordinator", "worker"} {
		cert := readCert(t, filepath.Join(dir, role+".pem"))
		for _, name := range dialedNames(t, m, 3) {
			if err := cert.VerifyHostname(name); err != nil {
				t.Errorf("%s certificate: %v", role, err)
			}
		}
	}
}

// chartCertHosts are the DNS names of the chart's coordinator Certificate (what
// NOTES.txt tells `qwenctl certs --hosts`), less localhost.
func chartCertHosts(t testing.TB, m Manifests) []string {
	t.Helper()
	for _, c := range Of[Certificate](m) {
		if strings.HasSuffix(c.Name, "-coordinator") {
			var out []string
			for _, h := range c.Spec.DNSNames {
				if h != "localhost" {
					out = append(out, h)
				}
			}
			return out
		}
	}
	t.Fatal("no coordinator Certificate rendered")
	return nil
}

// dialedNames are the host names parts of the release dial: the coordinator Service's,
// the first pods workers advertise, the etcd endpoints and peer URLs.
func dialedNames(t testing.TB, m Manifests, workers int) []string {
	t.Helper()
	var names []string
	svc := testRelease + "-qwenfleet-coordinator"
	names = append(names, svc, svc+"."+testNamespace, svc+"."+testNamespace+".svc", svc+"."+testNamespace+".svc.cluster.local")
	w := workload(t, m, "worker")
	c := container(t, w.spec, "worker")
	for i := 0; i < workers; i++ {
		adv := strings.ReplaceAll(flagValue(c.Args, "--advertise"), "$(POD_NAME)", fmt.Sprintf("%s-%d", w.name, i))
		host, _, err := net.SplitHostPort(adv)
		if err != nil {
			t.Fatalf("worker --advertise=%s: %v", adv, err)
		}
		names = append(names, host)
	}
	for _, ep := range strings.Split(flagValue(c.Args, "--etcd-endpoints"), ",") {
		u, err := url.Parse(ep)
		if err != nil || u.Scheme != "https" {
			t.Fatalf("--etcd-endpoints: %q is not an https URL", ep)
		}
		names = append(names, u.Hostname())
	}
	if e := findWorkload(m, "etcd"); e != nil {
		ec := container(t, e.spec, "etcd")
		for i := 0; i < int(*e.replicas); i++ {
			u, err := url.Parse(strings.ReplaceAll(flagValue(ec.Args, "--initial-advertise-peer-urls"), "$(POD_NAME)", fmt.Sprintf("%s-%d", e.name, i)))
			if err != nil {
				t.Fatal(err)
			}
			names = append(names, u.Hostname())
		}
	}
	return names
}

func readCert(t testing.TB, file string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("%s: no PEM block", file)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// writeTestCerts makes certificates and an API keys file in a temporary directory.
func writeTestCerts(t testing.TB, hosts []string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "tls")
	if err := security.WriteCerts(dir, hosts, false); err != nil {
		t.Fatal(err)
	}
	if _, err := security.AddAPIKey(filepath.Join(dir, "keys.jsonl"), "admin", security.APIRoleAdmin); err != nil {
		t.Fatal(err)
	}
	return dir
}

// certFileArgs are the helm arguments that give the chart the certificates of dir.
func certFileArgs(dir string) []string {
	args := []string{"--set", "tls.source=files"}
	for key, file := range map[string]string{"ca": "ca.pem", "coordinatorCert": "coordinator.pem", "coordinatorKey": "coordinator-key.pem",
		"workerCert": "worker.pem", "workerKey": "worker-key.pem", "clientCert": "client.pem", "clientKey": "client-key.pem", "gossipKey": "gossip.key"} {
		args = append(args, "--set-file", "tls.files."+key+"="+filepath.Join(dir, file))
	}
	return args
}

func checkCertManager(t *testing.T, m Manifests) {
	certs := Of[Certificate](m)
	roles := map[string]*Certificate{}
	for _, c := range certs {
		for _, u := range c.Spec.URIs {
			if r, ok := strings.CutPrefix(u, "qwenfleet://role/"); ok {
				roles[r] = c
			}
		}
		if c.Spec.IssuerRef.Name != "qwenfleet-ca" {
			t.Errorf("Certificate %s issuer %q", c.Name, c.Spec.IssuerRef.Name)
		}
	}
	for _, role := range []string{"coordinator", "worker", "client"} {
		c := roles[role]
		if c == nil {
			t.Errorf("no Certificate with the URI SAN qwenfleet://role/%s", role)
			continue
		}
		if !contains(c.Spec.Usages, "client auth") || (role != "client") != contains(c.Spec.Usages, "server auth") {
			t.Errorf("Certificate %s usages %v", c.Name, c.Spec.Usages)
		}
		if u, err := url.Parse("qwenfleet://role/" + role); err != nil || u.Host != "role" {
			t.Errorf("qwenfleet://role/%s does not parse as pkg/security reads it", role)
		}
	}
	// Each pod mounts the Secret of its role's Certificate, and etcd the coordinator's.
	for comp, role := range map[string]string{"coordinator": "coordinator", "worker": "worker", "etcd": "coordinator"} {
		w := workload(t, m, comp)
		found := false
		for _, v := range w.spec.Volumes {
			if v.Name != "tls" || v.Projected == nil {
				continue
			}
			for _, src := range v.Projected.Sources {
				if src.Secret != nil && roles[role] != nil && src.Secret.Name == roles[role].Spec.SecretName {
					found = true
				}
			}
		}
		if !found {
			t.Errorf("%s pods do not mount the %s Certificate's Secret", comp, role)
		}
	}
	if err := func() error {
		for _, sm := range Of[ServiceMonitor](m) {
			for _, ep := range sm.Spec.Endpoints {
				if ep.Scheme == "https" && (ep.TLSConfig == nil || ep.TLSConfig.Cert == nil || ep.TLSConfig.KeySecret == nil || ep.TLSConfig.Cert.Secret.Name != roles["client"].Spec.SecretName) {
					return fmt.Errorf("ServiceMonitor %s scrapes https without the client certificate", sm.Name)
				}
			}
		}
		return nil
	}(); err != nil {
		t.Error(err)
	}
	for _, cm := range Of[corev1.ConfigMap](m) {
		if js := cm.Data["qwenfleet-dashboard.json"]; !strings.Contains(js, `"uid": "qwenfleet"`) {
			t.Errorf("ConfigMap %s holds no dashboard", cm.Name)
		}
	}
}

// A workload of the release: a Deployment or a StatefulSet, by component.
type wl struct {
	kind, name, component string
	replicas              *int32
	selector              *metav1.LabelSelector
	meta                  metav1.ObjectMeta // the pod template's
	spec                  *corev1.PodSpec
	sts                   *appsv1.StatefulSet
}

func workloads(m Manifests) []*wl {
	var out []*wl
	for _, d := range Of[appsv1.Deployment](m) {
		out = append(out, &wl{kind: "Deployment", name: d.Name, component: d.Spec.Template.Labels["app.kubernetes.io/component"], replicas: d.Spec.Replicas,
			selector: d.Spec.Selector, meta: d.Spec.Template.ObjectMeta, spec: &d.Spec.Template.Spec})
	}
	for _, s := range Of[appsv1.StatefulSet](m) {
		out = append(out, &wl{kind: "StatefulSet", name: s.Name, component: s.Spec.Template.Labels["app.kubernetes.io/component"], replicas: s.Spec.Replicas,
			selector: s.Spec.Selector, meta: s.Spec.Template.ObjectMeta, spec: &s.Spec.Template.Spec, sts: s})
	}
	return out
}

func findWorkload(m Manifests, component string) *wl {
	for _, w := range workloads(m) {
		if w.component == component {
			return w
		}
	}
	return nil
}

func workload(t testing.TB, m Manifests, component string) *wl {
	t.Helper()
	w := findWorkload(m, component)
	if w == nil {
		t.Fatalf("no workload of component %s (%s)", component, strings.Join(kinds(m), " "))
	}
	return w
}

func container(t testing.TB, spec *corev1.PodSpec, name string) *corev1.Container {
	t.Helper()
	for i := range spec.Containers {
		if spec.Containers[i].Name == name {
			return &spec.Containers[i]
		}
	}
	t.Fatalf("no container %s", name)
	return nil
}

func initContainer(spec *corev1.PodSpec, name string) *corev1.Container {
	for i := range spec.InitContainers {
		if spec.InitContainers[i].Name == name {
			return &spec.InitContainers[i]
		}
	}
	return nil
}

// flagValue is the value of --name=value in args ("" when absent).
func flagValue(args []string, name string) string {
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v
		}
	}
	return ""
}

func contains[T comparable](xs []T, x T) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}

func matches(sel *metav1.LabelSelector, lbls map[string]string) bool {
	if sel == nil {
		return false
	}
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		return false
	}
	return s.Matches(labels.Set(lbls))
}

var varRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// checkRelease holds for every rendering of the chart.
func checkRelease(t *testing.T, m Manifests, ns string) {
	t.Helper()
	ws := workloads(m)
	if findWorkload(m, "coordinator") == nil || findWorkload(m, "worker") == nil {
		t.Fatalf("no coordinator or worker workload (%s)", strings.Join(kinds(m), " "))
	}
	for _, o := range m.Objects {
		if o.Namespace != ns {
			t.Errorf("%s: namespace %q, want %q", o, o.Namespace, ns)
		}
	}
	for _, w := range ws {
		checkWorkload(t, w)
	}
	if w := findWorkload(m, "worker"); w != nil && w.kind != "StatefulSet" {
		t.Errorf("workers are a %s, want a StatefulSet", w.kind)
	}
	if c := findWorkload(m, "coordinator"); c != nil && (c.kind != "Deployment" || *c.replicas < 2) {
		t.Errorf("coordinators: a %s of %d, want a Deployment of 2 or more", c.kind, *c.replicas)
	}

	services := Of[corev1.Service](m)
	for _, s := range services {
		var sel []*wl
		for _, w := range ws {
			if len(s.Spec.Selector) > 0 && labels.SelectorFromSet(s.Spec.Selector).Matches(labels.Set(w.meta.Labels)) {
				sel = append(sel, w)
			}
		}
		if len(sel) != 1 {
			t.Errorf("Service %s selects %d workloads, want 1", s.Name, len(sel))
			continue
		}
		for _, p := range s.Spec.Ports {
			if !hasPort(sel[0].spec, p.TargetPort) {
				t.Errorf("Service %s port %s: target %s is no port of %s", s.Name, p.Name, p.TargetPort.String(), sel[0].name)
			}
		}
	}
	for _, w := range ws {
		if w.sts == nil {
			continue
		}
		var headless *corev1.Service
		for _, s := range services {
			if s.Name == w.sts.Spec.ServiceName {
				headless = s
			}
		}
		switch {
		case headless == nil:
			t.Errorf("StatefulSet %s: serviceName %q names no Service", w.name, w.sts.Spec.ServiceName)
		case headless.Spec.ClusterIP != corev1.ClusterIPNone || !headless.Spec.PublishNotReadyAddresses:
			t.Errorf("StatefulSet %s: Service %s is not headless with publishNotReadyAddresses (peers are dialled before they are ready)", w.name, headless.Name)
		case !labels.SelectorFromSet(headless.Spec.Selector).Matches(labels.Set(w.meta.Labels)):
			t.Errorf("StatefulSet %s: Service %s does not select its pods", w.name, headless.Name)
		}
		if w.sts.Spec.PodManagementPolicy != appsv1.ParallelPodManagement {
			t.Errorf("StatefulSet %s: podManagementPolicy %q, want Parallel (a replica or an etcd quorum needs its pods together)", w.name, w.sts.Spec.PodManagementPolicy)
		}
	}
	pdbs := Of[policyv1.PodDisruptionBudget](m)
	for _, p := range pdbs {
		n := 0
		for _, w := range ws {
			if matches(p.Spec.Selector, w.meta.Labels) {
				n++
			}
		}
		if n != 1 {
			t.Errorf("PodDisruptionBudget %s selects %d workloads, want 1", p.Name, n)
		}
	}
	hasPDB := func(component string) bool {
		w := findWorkload(m, component)
		for _, p := range pdbs {
			if w != nil && matches(p.Spec.Selector, w.meta.Labels) {
				return true
			}
		}
		return false
	}
	if !hasPDB("worker") {
		t.Errorf("no PodDisruptionBudget for the workers")
	}
	if findWorkload(m, "etcd") != nil && !hasPDB("etcd") {
		t.Errorf("no PodDisruptionBudget for etcd")
	}
	checkWorkerDrain(t, m)
	checkNetworkPolicies(t, m, ns)
}

func hasPort(spec *corev1.PodSpec, p intstr.IntOrString) bool {
	for _, c := range spec.Containers {
		for _, cp := range c.Ports {
			if (p.Type == intstr.String && cp.Name == p.StrVal) || (p.Type == intstr.Int && cp.ContainerPort == p.IntVal) {
				return true
			}
		}
	}
	return false
}

func checkWorkload(t *testing.T, w *wl) {
	t.Helper()
	where := w.kind + " " + w.name
	if !matches(w.selector, w.meta.Labels) {
		t.Errorf("%s: selector %v does not match the pod labels %v", where, w.selector, w.meta.Labels)
	}
	ps := w.spec
	psc := ps.SecurityContext
	switch {
	case psc == nil:
		t.Errorf("%s: no pod securityContext", where)
	case psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || psc.RunAsUser == nil || *psc.RunAsUser == 0:
		t.Errorf("%s: the pod may run as root", where)
	case psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault:
		t.Errorf("%s: no RuntimeDefault seccomp profile", where)
	}
	if ps.AutomountServiceAccountToken == nil || *ps.AutomountServiceAccountToken {
		t.Errorf("%s: mounts a service account token (the pods call no Kubernetes API)", where)
	}
	if ps.HostNetwork || ps.HostPID || ps.HostIPC {
		t.Errorf("%s: shares a host namespace", where)
	}
	vols := map[string]corev1.Volume{}
	for _, v := range ps.Volumes {
		vols[v.Name] = v
	}
	if w.sts != nil {
		for _, c := range w.sts.Spec.VolumeClaimTemplates {
			vols[c.Name] = corev1.Volume{Name: c.Name, VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: c.Name}}}
		}
	}
	all := append(append([]corev1.Container{}, ps.InitContainers...), ps.Containers...)
	for i, c := range all {
		main := i >= len(ps.InitContainers)
		cw := where + " container " + c.Name
		sc := c.SecurityContext
		switch {
		case sc == nil:
			t.Errorf("%s: no securityContext", cw)
		case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
			t.Errorf("%s: privilege escalation allowed", cw)
		case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
			t.Errorf("%s: writable root filesystem", cw)
		case sc.Privileged != nil && *sc.Privileged:
			t.Errorf("%s: privileged", cw)
		case sc.Capabilities == nil || !contains(sc.Capabilities.Drop, corev1.Capability("ALL")) || len(sc.Capabilities.Add) > 0:
			t.Errorf("%s: capabilities not all dropped", cw)
		case sc.RunAsNonRoot != nil && !*sc.RunAsNonRoot, sc.RunAsUser != nil && *sc.RunAsUser == 0:
			t.Errorf("%s: may run as root", cw)
		}
		if !strings.HasSuffix(c.Image, ":"+server.Version) {
			t.Errorf("%s: image %s is not tagged %s (pkg/server.Version, what scripts/build-images.sh tags)", cw, c.Image, server.Version)
		}
		r := c.Resources
		if r.Requests.Cpu().IsZero() || r.Requests.Memory().IsZero() || r.Limits.Memory().IsZero() {
			t.Errorf("%s: resources %v: want cpu and memory requests and a memory limit", cw, r)
		}
		tmp := false
		for _, vm := range c.VolumeMounts {
			v, ok := vols[vm.Name]
			if !ok {
				t.Errorf("%s: mount %s names no volume", cw, vm.Name)
				continue
			}
			if vm.MountPath == "/tmp" && v.EmptyDir != nil && !vm.ReadOnly {
				tmp = true
			}
			if (v.Secret != nil || v.Projected != nil) && !vm.ReadOnly && main {
				t.Errorf("%s: secret volume %s mounted writable", cw, vm.Name)
			}
			if vm.SubPath != "" && (v.Secret != nil || v.Projected != nil) {
				t.Errorf("%s: secret volume %s mounted with subPath: it would not follow rotations", cw, vm.Name)
			}
		}
		if !tmp {
			t.Errorf("%s: no writable emptyDir at /tmp (the root filesystem is read-only)", cw)
		}
		env := map[string]bool{}
		for _, e := range c.Env {
			env[e.Name] = true
		}
		for _, a := range append(append([]string{}, c.Command...), c.Args...) {
			for _, ref := range varRef.FindAllStringSubmatch(a, -1) {
				if !env[ref[1]] {
					t.Errorf("%s: %q refers to $(%s), which its env does not define (kubelet would pass it verbatim)", cw, a, ref[1])
				}
			}
		}
		if !main {
			continue
		}
		ports := map[string]int32{}
		for _, p := range c.Ports {
			ports[p.Name] = p.ContainerPort
		}
		for name, p := range map[string]*corev1.Probe{"readiness": c.ReadinessProbe, "liveness": c.LivenessProbe, "startup": c.StartupProbe} {
			if p == nil {
				t.Errorf("%s: no %s probe", cw, name)
				continue
			}
			port := int32(-1)
			switch {
			case p.GRPC != nil:
				port = p.GRPC.Port
				if hl := flagValue(c.Args, "--health-listen"); hl != "0.0.0.0:"+strconv.Itoa(int(port)) {
					t.Errorf("%s: %s probe on gRPC port %d, but --health-listen=%s (kubelet's gRPC probes speak no TLS)", cw, name, port, hl)
				}
			case p.TCPSocket != nil:
				port = resolvePort(p.TCPSocket.Port, ports)
			case p.HTTPGet != nil:
				port = resolvePort(p.HTTPGet.Port, ports)
			default:
				t.Errorf("%s: %s probe is neither gRPC, TCP nor HTTP", cw, name)
			}
			if !contains(mapValues(ports), port) {
				t.Errorf("%s: %s probe port %d is not a container port", cw, name, port)
			}
		}
		if w.component == "coordinator" || w.component == "worker" {
			checkServerContainer(t, cw, w.component, &c, ports)
		}
		if w.component == "coordinator" {
			dd := flagValue(c.Args, "--data-dir")
			ok := false
			for _, vm := range c.VolumeMounts {
				if v := vols[vm.Name]; v.EmptyDir != nil && !vm.ReadOnly && strings.HasPrefix(dd, strings.TrimSuffix(vm.MountPath, "/")+"/") {
					ok = true // a directory the coordinator makes itself (its own, 0700)
				}
			}
			if !ok {
				t.Errorf("%s: --data-dir=%s is not a directory inside a writable emptyDir", cw, dd)
			}
			if c.ReadinessProbe == nil || c.ReadinessProbe.GRPC == nil {
				t.Errorf("%s: readiness is not the gRPC health (the Service must route to the leader only)", cw)
			}
		}
		if w.component == "worker" {
			adv := flagValue(c.Args, "--advertise")
			want := fmt.Sprintf("$(POD_NAME).%s.%s.svc.cluster.local:%d", w.sts.Spec.ServiceName, w.sts.Namespace, ports["grpc"])
			if adv != want {
				t.Errorf("%s: --advertise=%s, want %s (its stable peer name)", cw, adv, want)
			}
			if flagValue(c.Args, "--model-root") == "" || flagValue(c.Args, "--tls-dir") == "" {
				t.Errorf("%s: no --model-root or --tls-dir", cw)
			}
		}
	}
}

// checkServerContainer: what a coordinator or worker container needs beyond any
// workload's: probes of the right health service, the addresses it listens on and is known
// by, a fixed gossip port declared as container ports, and (workers) the node's name as
// the placement's host.
func checkServerContainer(t *testing.T, cw, component string, c *corev1.Container, ports map[string]int32) {
	t.Helper()
	// Liveness and startup ask the service that is SERVING while the process serves (a
	// standby coordinator included: "" would restart it); readiness asks "" (a
	// coordinator: only the leader with a ready replica is ready).
	for name, p := range map[string]*corev1.Probe{"liveness": c.LivenessProbe, "startup": c.StartupProbe} {
		if p == nil || p.GRPC == nil || p.GRPC.Service == nil || *p.GRPC.Service != server.LivenessService {
			t.Errorf("%s: %s probe is not gRPC with service %q", cw, name, server.LivenessService)
		}
	}
	if p := c.ReadinessProbe; p == nil || p.GRPC == nil || (p.GRPC.Service != nil && *p.GRPC.Service != "") {
		t.Errorf("%s: readiness probe is not gRPC with service \"\"", cw)
	}
	env := map[string]string{}
	for _, e := range c.Env {
		if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
			env[e.Name] = e.ValueFrom.FieldRef.FieldPath
		}
	}
	// Gossip on one fixed port, TCP and UDP, declared as the container's ports (the
	// NetworkPolicy opens that port alone: checkNetworkPolicies).
	gp, err := strconv.Atoi(flagValue(c.Args, "--gossip-port"))
	if err != nil || gp < 1 || gp > 65535 {
		t.Errorf("%s: --gossip-port=%q is not a fixed port", cw, flagValue(c.Args, "--gossip-port"))
	}
	for _, p := range c.Ports {
		if want := map[string]corev1.Protocol{"gossip": corev1.ProtocolTCP, "gossip-udp": corev1.ProtocolUDP}[p.Name]; want != "" && p.Protocol != want {
			t.Errorf("%s: container port %s is %s, want %s", cw, p.Name, p.Protocol, want)
		}
	}
	if int(ports["gossip"]) != gp || int(ports["gossip-udp"]) != gp {
		t.Errorf("%s: container ports gossip %d and gossip-udp %d, want --gossip-port %d", cw, ports["gossip"], ports["gossip-udp"], gp)
	}
	switch component {
	case "coordinator":
		// Known by the pod's IP: unique per coordinator, dialable, never 0.0.0.0. It
		// listens there (gossip then binds and announces the pod's IP with its port) or
		// on every interface.
		if got := flagValue(c.Args, "--listen"); got != fmt.Sprintf("$(POD_IP):%d", ports["grpc"]) && got != fmt.Sprintf("0.0.0.0:%d", ports["grpc"]) {
			t.Errorf("%s: --listen=%s, want the pod's IP or every interface, port %d", cw, got, ports["grpc"])
		}
		if got, want := flagValue(c.Args, "--advertise"), fmt.Sprintf("$(POD_IP):%d", ports["grpc"]); got != want || env["POD_IP"] != "status.podIP" {
			t.Errorf("%s: --advertise=%s (POD_IP from %q), want %s with POD_IP the pod's IP", cw, got, env["POD_IP"], want)
		}
	case "worker":
		if got := flagValue(c.Args, "--host"); got != "$(NODE_NAME)" || env["NODE_NAME"] != "spec.nodeName" {
			t.Errorf("%s: --host=%s (NODE_NAME from %q), want $(NODE_NAME), the node's name (spec.nodeName)", cw, got, env["NODE_NAME"])
		}
	}
}

func resolvePort(p intstr.IntOrString, ports map[string]int32) int32 {
	if p.Type == intstr.String {
		if v, ok := ports[p.StrVal]; ok {
			return v
		}
		return -1
	}
	return p.IntVal
}

func mapValues[K comparable, V any](m map[K]V) []V {
	var out []V
	for _, v := range m {
		out = append(out, v)
	}
	return out
}

// checkWorkerDrain: a worker drains on SIGTERM for --drain-timeout plus a 15 s grace;
// Kubernetes must not kill it before.
func checkWorkerDrain(t *testing.T, m Manifests) {
	w := findWorkload(m, "worker")
	if w == nil {
		return
	}
	c := container(t, w.spec, "worker")
	d := strings.TrimSuffix(flagValue(c.Args, "--drain-timeout"), "s")
	secs, err := strconv.Atoi(d)
	if err != nil {
		t.Errorf("worker --drain-timeout=%q is not whole seconds", flagValue(c.Args, "--drain-timeout"))
		return
	}
	if g := w.spec.TerminationGracePeriodSeconds; g == nil || *g <= int64(secs+15) {
		t.Errorf("worker terminationGracePeriodSeconds %v <= --drain-timeout %ds + 15 s", g, secs)
	}
}

// A pod as the NetworkPolicy evaluator sees it.
type npPod struct {
	name     string
	ns       string
	nsLabels map[string]string
	labels   map[string]string
}

func checkNetworkPolicies(t *testing.T, m Manifests, ns string) {
	t.Helper()
	pols := Of[networkingv1.NetworkPolicy](m)
	nsLabels := func(n string) map[string]string { return map[string]string{"kubernetes.io/metadata.name": n} }
	pod := func(component string) npPod {
		w := findWorkload(m, component)
		if w == nil {
			return npPod{}
		}
		return npPod{name: component, ns: ns, nsLabels: nsLabels(ns), labels: w.meta.Labels}
	}
	// Default deny: a policy of both types, no rule, selecting every pod of the release.
	deny := false
	for _, p := range pols {
		if len(p.Spec.Ingress) == 0 && len(p.Spec.Egress) == 0 && contains(p.Spec.PolicyTypes, networkingv1.PolicyTypeIngress) &&
			contains(p.Spec.PolicyTypes, networkingv1.PolicyTypeEgress) {
			all := true
			for _, w := range workloads(m) {
				all = all && matches(&p.Spec.PodSelector, w.meta.Labels)
			}
			deny = deny || all
		}
	}
	if !deny {
		t.Errorf("no default-deny NetworkPolicy (ingress and egress, no rule) over every pod of the release")
	}
	coord, worker, etcd := pod("coordinator"), pod("worker"), pod("etcd")
	client := npPod{name: "client", ns: ns, nsLabels: nsLabels(ns), labels: map[string]string{"qwenfleet.io/client": "true"}}
	stranger := npPod{name: "stranger", ns: ns, nsLabels: nsLabels(ns), labels: map[string]string{"app": "other"}}
	prom := npPod{name: "prometheus", ns: "monitoring", nsLabels: nsLabels("monitoring"), labels: map[string]string{"app.kubernetes.io/name": "prometheus"}}
	dns := npPod{name: "kube-dns", ns: "kube-system", nsLabels: nsLabels("kube-system"), labels: map[string]string{"k8s-app": "kube-dns"}}
	outside := npPod{name: "elsewhere", ns: "other", nsLabels: nsLabels("other"), labels: map[string]string{"app": "x"}}

	cp := func(w string, name string) int32 {
		wk := findWorkload(m, w)
		for _, c := range wk.spec.Containers {
			for _, p := range c.Ports {
				if p.Name == name {
					return p.ContainerPort
				}
			}
		}
		t.Fatalf("%s has no port %s", w, name)
		return 0
	}
	type flow struct {
		from, to npPod
		port     int32
		proto    corev1.Protocol
		allow    bool
	}
	// Gossip is on the fixed port of the containers (--gossip-port: checkServerContainer);
	// the policy opens that one alone between coordinators and workers.
	gossip := cp("worker", "gossip")
	if g := cp("coordinator", "gossip"); g != gossip {
		t.Errorf("coordinators gossip on %d, workers on %d: one port, that the policy opens", g, gossip)
	}
	flows := []flow{
		{client, coord, cp("coordinator", "grpc"), corev1.ProtocolTCP, true},
		{stranger, coord, cp("coordinator", "grpc"), corev1.ProtocolTCP, false},
		{outside, coord, cp("coordinator", "grpc"), corev1.ProtocolTCP, false},
		{client, worker, cp("worker", "grpc"), corev1.ProtocolTCP, false},
		{coord, worker, cp("worker", "grpc"), corev1.ProtocolTCP, true},
		{worker, worker, cp("worker", "grpc"), corev1.ProtocolTCP, true},
		// Workers call no coordinator: its public API and metrics are closed to them.
		{worker, coord, cp("coordinator", "grpc"), corev1.ProtocolTCP, false},
		{worker, coord, cp("coordinator", "metrics"), corev1.ProtocolTCP, false},
		{coord, coord, cp("coordinator", "grpc"), corev1.ProtocolTCP, false},
		{prom, coord, cp("coordinator", "metrics"), corev1.ProtocolTCP, true},
		{prom, worker, cp("worker", "metrics"), corev1.ProtocolTCP, true},
		{stranger, worker, cp("worker", "metrics"), corev1.ProtocolTCP, false},
		{stranger, worker, gossip, corev1.ProtocolUDP, false},
		{client, coord, gossip, corev1.ProtocolTCP, false},
		{worker, outside, 443, corev1.ProtocolTCP, false},
		{coord, outside, 443, corev1.ProtocolTCP, false},
	}
	for _, a := range []npPod{coord, worker} {
		for _, b := range []npPod{coord, worker} {
			flows = append(flows, flow{a, b, gossip, corev1.ProtocolUDP, true}, flow{a, b, gossip, corev1.ProtocolTCP, true})
			// Any other port between them stays closed (memberlist once bound a free one,
			// and the policy opened 1024–65535).
			for _, port := range []int32{gossip + 1, 38123, 1024, 65535} {
				flows = append(flows, flow{a, b, port, corev1.ProtocolUDP, false}, flow{a, b, port, corev1.ProtocolTCP, false})
			}
		}
	}
	for _, a := range []npPod{coord, worker, etcd} {
		if a.name == "" {
			continue
		}
		flows = append(flows, flow{a, dns, 53, corev1.ProtocolUDP, true}, flow{a, dns, 53, corev1.ProtocolTCP, true})
	}
	if etcd.name != "" {
		client := cp("etcd", "client")
		flows = append(flows,
			flow{coord, etcd, client, corev1.ProtocolTCP, true},
			flow{worker, etcd, client, corev1.ProtocolTCP, true},
			flow{etcd, etcd, cp("etcd", "peer"), corev1.ProtocolTCP, true},
			flow{coord, etcd, cp("etcd", "peer"), corev1.ProtocolTCP, false},
			flow{stranger, etcd, client, corev1.ProtocolTCP, false},
			flow{prom, etcd, cp("etcd", "metrics"), corev1.ProtocolTCP, true},
			flow{etcd, outside, 443, corev1.ProtocolTCP, false})
	}
	for _, f := range flows {
		if got := npAllowed(pols, f.from, f.to, f.port, f.proto); got != f.allow {
			t.Errorf("NetworkPolicy: %s → %s %d/%s allowed %v, want %v", f.from.name, f.to.name, f.port, f.proto, got, f.allow)
		}
	}
}

// npAllowed evaluates NetworkPolicies as Kubernetes does: traffic passes when the
// destination's ingress and the source's egress both allow it (a pod no policy of that
// type selects allows everything of that direction).
func npAllowed(pols []*networkingv1.NetworkPolicy, from, to npPod, port int32, proto corev1.Protocol) bool {
	return npDirection(pols, networkingv1.PolicyTypeIngress, to, from, port, proto) &&
		npDirection(pols, networkingv1.PolicyTypeEgress, from, to, port, proto)
}

func npDirection(pols []*networkingv1.NetworkPolicy, typ networkingv1.PolicyType, subject, peer npPod, port int32, proto corev1.Protocol) bool {
	selected := false
	for _, p := range pols {
		if p.Namespace != subject.ns || !matches(&p.Spec.PodSelector, subject.labels) || !contains(p.Spec.PolicyTypes, typ) {
			continue
		}
		selected = true
		if typ == networkingv1.PolicyTypeIngress {
			for _, r := range p.Spec.Ingress {
				if npPeers(r.From, p.Namespace, peer) && npPorts(r.Ports, port, proto) {
					return true
				}
			}
		} else {
			for _, r := range p.Spec.Egress {
				if npPeers(r.To, p.Namespace, peer) && npPorts(r.Ports, port, proto) {
					return true
				}
			}
		}
	}
	return !selected
}

func npPeers(peers []networkingv1.NetworkPolicyPeer, ns string, pod npPod) bool {
	if len(peers) == 0 {
		return true
	}
	for _, p := range peers {
		switch {
		case p.IPBlock != nil:
			// Pod IPs are not modelled: an ipBlock matches no pod here.
		case p.NamespaceSelector == nil:
			if pod.ns == ns && matches(p.PodSelector, pod.labels) {
				return true
			}
		default:
			if matches(p.NamespaceSelector, pod.nsLabels) && (p.PodSelector == nil || matches(p.PodSelector, pod.labels)) {
				return true
			}
		}
	}
	return false
}

func npPorts(ports []networkingv1.NetworkPolicyPort, port int32, proto corev1.Protocol) bool {
	if len(ports) == 0 {
		return true
	}
	for _, p := range ports {
		pr := corev1.ProtocolTCP
		if p.Protocol != nil {
			pr = *p.Protocol
		}
		if pr != proto {
			continue
		}
		if p.Port == nil {
			return true
		}
		if p.Port.Type == intstr.Int {
			lo, hi := p.Port.IntVal, p.Port.IntVal
			if p.EndPort != nil {
				hi = *p.EndPort
			}
			if port >= lo && port <= hi {
				return true
			}
		}
	}
	return false
}

// The values file the chart documents parses (a sanity check of its YAML and of the keys
// the templates read).
func TestValuesParse(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(chartDir(t), "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var v map[string]any
	if err := yaml.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"model", "parallelism", "tls", "apiKeys", "etcd", "coordinator", "worker", "networkPolicy", "metrics", "podSecurityContext", "securityContext"} {
		if _, ok := v[k]; !ok {
			t.Errorf("values.yaml has no %s", k)
		}
	}
}

// TestNotes: NOTES.txt's `qwenctl certs --hosts` lists the names the chart's certificates
// need, and its first call is a valid pod that reaches the coordinator Service with the
// CA and an API key (TestCPUDemoInDocker runs that call).
func TestNotes(t *testing.T) {
	for name, file := range presets(t) {
		notes := Notes(t, testRelease, testNamespace, "-f", file)
		m := Render(t, testRelease, testNamespace, "-f", file, "--set", "tls.source=certManager", "--set", "tls.certManager.issuerRef.name=ca")
		hosts := "--hosts '" + strings.Join(chartCertHosts(t, m), ",") + "'"
		if !strings.Contains(notes, hosts) {
			t.Errorf("%s: NOTES.txt lacks qwenctl certs %s", name, hosts)
		}
		pod := FirstCall(t, notes, "qf_KEY")
		if len(pod.Spec.Containers) != 1 {
			t.Fatalf("%s: first call pod has %d containers", name, len(pod.Spec.Containers))
		}
		c := pod.Spec.Containers[0]
		want := []string{"generate", "--addr", testRelease + "-qwenfleet-coordinator:50051", "--tls-dir", "/tls", "--api-key", "qf_KEY"}
		if len(c.Args) < len(want) || !slices.Equal(c.Args[:len(want)], want) {
			t.Errorf("%s: first call args %q, want them to start %q", name, c.Args, want)
		}
		if len(pod.Spec.Volumes) != 1 || pod.Spec.Volumes[0].Secret == nil || pod.Spec.Volumes[0].Secret.SecretName != testRelease+"-qwenfleet-tls" ||
			len(c.VolumeMounts) != 1 || c.VolumeMounts[0].MountPath != "/tls" {
			t.Errorf("%s: first call does not mount ca.pem of the TLS Secret at /tls: %+v %+v", name, pod.Spec.Volumes, c.VolumeMounts)
		}
	}
}
