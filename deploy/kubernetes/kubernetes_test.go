package kubernetes

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

// overlays are the overlays this test renders, with the regions each has
// and whether it is production-shaped (hard spreading across zones).
var overlays = []struct {
	name       string
	regions    []string
	production bool
}{
	{name: "dev", regions: []string{"us-east"}},
	{name: "production", regions: []string{"us-east", "eu-west"}, production: true},
}

// serverRoles hold key material in RAM: their containers add IPC_LOCK.
var serverRoles = []string{"distributor", "rootkms", "kms"}

// callers are the pods outside Cairn's workloads the policies are checked
// against: the documented callers, and strangers that must reach nothing.
func callers(ns string) []Pod {
	role := func(r string) map[string]string { return map[string]string{RoleLabel: r} }
	return []Pod{
		{Role: "client", Namespace: "storage", NamespaceLabels: map[string]string{"cairn.dev/kms-clients": "true"}, Labels: role("client"), IP: netip.MustParseAddr("10.244.9.1")},
		// A pod that calls itself a client, in a namespace not let in.
		{Role: "stranger", Namespace: "elsewhere", Labels: role("client"), IP: netip.MustParseAddr("10.244.9.2")},
		{Role: "stranger", Namespace: "default", IP: netip.MustParseAddr("10.244.9.3")},
		{Role: "stranger", Namespace: ns, Labels: map[string]string{"app": "debug"}, IP: netip.MustParseAddr("10.244.9.4"), Governed: true},
		{Role: "external", Namespace: "", IP: netip.MustParseAddr("203.0.113.10")},
		{Role: "officer", Namespace: ns, Labels: role("officer"), IP: netip.MustParseAddr("10.244.9.5"), Governed: true},
		{Role: "regionctl", Namespace: ns, Labels: role("regionctl"), IP: netip.MustParseAddr("10.244.9.6"), Governed: true},
		{Role: "operator", Namespace: ns, Labels: role("operator"), IP: netip.MustParseAddr("10.244.9.7"), Governed: true},
		{Role: "prometheus", Namespace: "monitoring", Labels: map[string]string{"app.kubernetes.io/name": "prometheus"}, IP: netip.MustParseAddr("10.244.9.8")},
		// Prometheus's name in another namespace is nobody.
		{Role: "stranger", Namespace: "default", Labels: map[string]string{"app.kubernetes.io/name": "prometheus"}, IP: netip.MustParseAddr("10.244.9.9")},
		{Role: "dns", Namespace: "kube-system", Labels: map[string]string{"k8s-app": "kube-dns"}, IP: netip.MustParseAddr("10.96.0.10"),
			Ports: []corev1.ContainerPort{{Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolUDP}, {Name: "dns-tcp", ContainerPort: 53, Protocol: corev1.ProtocolTCP}}},
	}
}

// trustGraph is every connection the policies must allow, and the only
// ones: DESIGN.md's chain, the control-plane callers each server's
// allowlist names (regionctl, operators, officers), scraping, and DNS.
func trustGraph() []Edge {
	tcp := func(from, to string, port int32) Edge {
		return Edge{From: from, To: to, Port: port, Protocol: corev1.ProtocolTCP}
	}
	edges := []Edge{
		tcp("client", "kms", 7401), tcp("client", "kms", 8200),
		tcp("regionctl", "kms", 7401),
		tcp("kms", "rootkms", 7201),
		tcp("regionctl", "rootkms", 7201),
		tcp("operator", "rootkms", 7201),
		tcp("officer", "rootkms", 7201),
		tcp("rootkms", "rootkms", 7201), tcp("rootkms", "rootkms", 7301),
		tcp("rootkms", "distributor", 7101),
		tcp("distributor", "distributor", 7101),
		tcp("officer", "distributor", 7101),
	}
	for _, r := range serverRoles {
		edges = append(edges, tcp("prometheus", r, 9090))
	}
	// Every pod of the namespace may resolve names, strangers too.
	for _, r := range append(slices.Clone(serverRoles), "officer", "regionctl", "operator", "stranger") {
		edges = append(edges, tcp(r, "dns", 53), Edge{From: r, To: "dns", Port: 53, Protocol: corev1.ProtocolUDP})
	}
	SortEdges(edges)
	return edges
}

func loadTree(t *testing.T) (filesys.FileSystem, string) {
	t.Helper()
	fsys, root, err := LoadTree(".")
	if err != nil {
		t.Fatal(err)
	}
	return fsys, root
}

func render(t *testing.T, fsys filesys.FileSystem, root, overlay string) *Objects {
	t.Helper()
	objs, err := Render(fsys, filepath.Join(root, "overlays", overlay))
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

// trustGraphError renders the overlay and compares its policies' edges
// with the trust graph.
func trustGraphError(t *testing.T, objs *Objects) error {
	t.Helper()
	ns := objs.Namespaces[0].Name
	edges, err := Edges(objs.NetworkPolicies, append(objs.Pods(), callers(ns)...))
	if err != nil {
		t.Fatal(err)
	}
	return CompareEdges(edges, trustGraph())
}

func TestNetworkPoliciesAllowExactlyTheTrustGraph(t *testing.T) {
	fsys, root := loadTree(t)
	for _, o := range overlays {
		t.Run(o.name, func(t *testing.T) {
			objs := render(t, fsys, root, o.name)
			if len(objs.Namespaces) != 1 {
				t.Fatalf("namespaces = %d, want 1", len(objs.Namespaces))
			}
			if err := trustGraphError(t, objs); err != nil {
				t.Error(err)
			}
			// Every Cairn pod is isolated both ways by a policy selecting all.
			var denyAll bool
			for _, np := range objs.NetworkPolicies {
				if len(np.Spec.PodSelector.MatchLabels) == 0 && len(np.Spec.PodSelector.MatchExpressions) == 0 &&
					len(np.Spec.Ingress) == 0 && len(np.Spec.Egress) == 0 && len(np.Spec.PolicyTypes) == 2 {
					denyAll = true
				}
			}
			if !denyAll {
				t.Error("no default-deny NetworkPolicy (empty podSelector, Ingress and Egress, no rules)")
			}
		})
	}
}

// TestTrustGraphCheckRefusesExtraEdges adds policies outside the trust
// graph to the dev overlay (in memory) and expects the check to name them.
func TestTrustGraphCheckRefusesExtraEdges(t *testing.T) {
	tests := []struct {
		name, policy string
		want         []string
	}{
		{
			name: "client to distributor",
			policy: `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: extra
spec:
  podSelector:
    matchLabels:
      cairn.dev/role: distributor
  policyTypes: ["Ingress"]
  ingress:
    - from:
        - namespaceSelector:
            matchLabels:
              cairn.dev/kms-clients: "true"
          podSelector:
            matchLabels:
              cairn.dev/role: client
      ports:
        - port: 7101
`,
			want: []string{"allowed outside the trust graph: client -> distributor 7101/TCP"},
		},
		{
			name: "kms to distributor, both directions opened",
			policy: `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: extra-in
spec:
  podSelector:
    matchLabels:
      cairn.dev/role: distributor
  policyTypes: ["Ingress"]
  ingress:
    - from:
        - podSelector:
            matchLabels:
              cairn.dev/role: kms
      ports:
        - port: grpc
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: extra-out
spec:
  podSelector:
    matchLabels:
      cairn.dev/role: kms
  policyTypes: ["Egress"]
  egress:
    - to:
        - podSelector:
            matchLabels:
              cairn.dev/role: distributor
`,
			want: []string{"allowed outside the trust graph: kms -> distributor 7101/TCP"},
		},
		{
			name: "any port from anywhere",
			policy: `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: extra
spec:
  podSelector:
    matchLabels:
      cairn.dev/role: kms
  policyTypes: ["Ingress"]
  ingress:
    - {}
`,
			want: []string{
				"allowed outside the trust graph: external -> kms 65000/TCP",
				"allowed outside the trust graph: stranger -> kms 7401/TCP",
				"allowed outside the trust graph: prometheus -> kms 8081/TCP",
			},
		},
		{
			name: "egress to the internet",
			policy: `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: extra
spec:
  podSelector:
    matchLabels:
      cairn.dev/role: distributor
  policyTypes: ["Egress"]
  egress:
    - to:
        - ipBlock:
            cidr: 0.0.0.0/0
            except: ["10.0.0.0/8"]
      ports:
        - port: 443
`,
			want: []string{"allowed outside the trust graph: distributor -> external 443/TCP"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fsys, root := loadTree(t)
			dev := filepath.Join(root, "overlays", "dev")
			if err := fsys.WriteFile(filepath.Join(dev, "extra-policy.yaml"), []byte(tt.policy)); err != nil {
				t.Fatal(err)
			}
			k, err := fsys.ReadFile(filepath.Join(dev, "kustomization.yaml"))
			if err != nil {
				t.Fatal(err)
			}
			k2 := strings.Replace(string(k), "resources:\n", "resources:\n  - extra-policy.yaml\n", 1)
			if k2 == string(k) {
				t.Fatal("the dev kustomization has no resources list to add to")
			}
			if err := fsys.WriteFile(filepath.Join(dev, "kustomization.yaml"), []byte(k2)); err != nil {
				t.Fatal(err)
			}
			err = trustGraphError(t, render(t, fsys, root, "dev"))
			if err == nil {
				t.Fatal("trust graph check passed with an extra policy, want it refused")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("trust graph error = %v\nwant it to contain %q", err, w)
				}
			}
		})
	}
}

// TestEdgesMissingEdgeReported: a policy that no longer admits a trust
// graph edge is reported too (removing kms -> rootkms).
func TestEdgesMissingEdgeReported(t *testing.T) {
	fsys, root := loadTree(t)
	objs := render(t, fsys, root, "dev")
	var kept = objs.NetworkPolicies[:0]
	for _, np := range objs.NetworkPolicies {
		if np.Name != "kms" {
			kept = append(kept, np)
		}
	}
	objs.NetworkPolicies = kept
	err := trustGraphError(t, objs)
	if err == nil || !strings.Contains(err.Error(), "trust-graph edge not allowed: kms -> rootkms 7201/TCP") {
		t.Errorf("trust graph error without the kms policy = %v, want kms -> rootkms reported missing", err)
	}
}

func TestWorkloads(t *testing.T) {
	fsys, root := loadTree(t)
	for _, o := range overlays {
		t.Run(o.name, func(t *testing.T) {
			objs := render(t, fsys, root, o.name)
			for _, y := range objs.YAML {
				if strings.Contains(y, "PRIVATE KEY") {
					t.Errorf("a rendered object holds a private key:\n%s", y)
				}
			}
			ws := objs.Workloads()
			if len(ws) == 0 {
				t.Fatal("no workloads rendered")
			}
			for _, w := range ws {
				t.Run(w.Kind+"/"+w.Name, func(t *testing.T) { checkWorkload(t, w, o.production) })
			}
			checkDistributors(t, objs)
			checkVoters(t, objs)
			for _, r := range o.regions {
				checkRegion(t, objs, r)
			}
			checkReferences(t, objs)
		})
	}
}

func checkWorkload(t *testing.T, w Workload, production bool) {
	spec := w.Template.Spec
	role := w.Template.Labels[RoleLabel]
	if !slices.Contains(serverRoles, role) {
		t.Fatalf("pod label %s = %q, want one of %v", RoleLabel, role, serverRoles)
	}
	sel, err := metav1.LabelSelectorAsSelector(w.Selector)
	if err != nil || !sel.Matches(labels.Set(w.Template.Labels)) {
		t.Errorf("selector %v does not select its own pod template (%v)", w.Selector, err)
	}
	// Pod security.
	psc := spec.SecurityContext
	if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot {
		t.Error("pod securityContext.runAsNonRoot is not true")
	}
	if psc == nil || psc.RunAsUser == nil || *psc.RunAsUser == 0 {
		t.Error("pod securityContext.runAsUser is not a non-zero UID")
	}
	if psc == nil || psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Error("pod seccompProfile is not RuntimeDefault")
	}
	if spec.HostNetwork || spec.HostPID || spec.HostIPC {
		t.Error("pod shares a host namespace")
	}
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		t.Error("automountServiceAccountToken is not false")
	}
	// Volumes: no Secret, no hostPath; the identity comes from the SPIFFE
	// CSI driver through an in-memory volume.
	vols := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		vols[v.Name] = v
		if v.Secret != nil || v.HostPath != nil || v.Projected != nil {
			t.Errorf("volume %s is a Secret, hostPath or projected volume", v.Name)
		}
	}
	if v, ok := vols["spiffe-workload-api"]; !ok || v.CSI == nil || v.CSI.Driver != "csi.spiffe.io" || v.CSI.ReadOnly == nil || !*v.CSI.ReadOnly {
		t.Error("no read-only volume spiffe-workload-api of the SPIFFE CSI driver (csi.spiffe.io)")
	}
	if v, ok := vols["svid"]; !ok || v.EmptyDir == nil || v.EmptyDir.Medium != corev1.StorageMediumMemory {
		t.Error("the SVID volume is not an in-memory emptyDir")
	}
	// Containers.
	if len(spec.InitContainers) != 1 || spec.InitContainers[0].Name != "spiffe-helper" ||
		spec.InitContainers[0].RestartPolicy == nil || *spec.InitContainers[0].RestartPolicy != corev1.ContainerRestartPolicyAlways {
		t.Error("want exactly one init container: the spiffe-helper native sidecar (restartPolicy Always)")
	} else if spec.InitContainers[0].StartupProbe == nil {
		t.Error("the spiffe-helper sidecar has no startupProbe: the server could start before its SVID exists")
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("containers = %d, want 1", len(spec.Containers))
	}
	for _, c := range slices.Concat(spec.InitContainers, spec.Containers) {
		wantAdd := []corev1.Capability(nil)
		if c.Name == spec.Containers[0].Name {
			wantAdd = []corev1.Capability{"IPC_LOCK"}
		}
		checkContainer(t, c, wantAdd)
	}
	main := spec.Containers[0]
	ports := map[string]int32{}
	for _, p := range main.Ports {
		ports[p.Name] = p.ContainerPort
	}
	for _, p := range []struct {
		name  string
		probe *corev1.Probe
		path  string
	}{{"liveness", main.LivenessProbe, "/healthz"}, {"readiness", main.ReadinessProbe, "/readyz"}} {
		switch {
		case p.probe == nil:
			t.Errorf("%s probe missing", p.name)
		case p.probe.HTTPGet != nil:
			if p.probe.HTTPGet.Path != p.path || ports[p.probe.HTTPGet.Port.String()] != 9090 {
				t.Errorf("%s probe = GET %s on port %s, want %s on the ops port (9090)", p.name, p.probe.HTTPGet.Path, p.probe.HTTPGet.Port.String(), p.path)
			}
		case p.probe.GRPC != nil:
			// kubelet's gRPC probe speaks plaintext: only a non-mTLS port could answer.
			t.Errorf("%s probe is a gRPC probe; the API ports are mTLS only, probe the ops listener", p.name)
		default:
			t.Errorf("%s probe is neither httpGet nor grpc", p.name)
		}
	}
	args := strings.Join(main.Args, " ")
	for _, want := range []string{"--cert=/svid/cert.pem", "--key=/svid/key.pem", "--ca=/svid/ca.pem", "--metrics-listen=0.0.0.0:9090", "--trust-domain=$(CAIRN_TRUST_DOMAIN)"} {
		if !slices.Contains(main.Args, want) {
			t.Errorf("args lack %s: %s", want, args)
		}
	}
	if role != "distributor" && !slices.Contains(main.Args, "--mlock=on") {
		t.Errorf("args lack --mlock=on (fail to start rather than run with swappable keys): %s", args)
	}
	var svidMount bool
	for _, m := range main.VolumeMounts {
		if m.Name == "svid" && m.MountPath == "/svid" && m.ReadOnly {
			svidMount = true
		}
	}
	if !svidMount {
		t.Error("the server does not mount the svid volume read-only at /svid")
	}
	// Spreading: across zones, by a selector that selects this workload's pods.
	var zone, host bool
	for _, c := range spec.TopologySpreadConstraints {
		s, err := metav1.LabelSelectorAsSelector(c.LabelSelector)
		if err != nil || !s.Matches(labels.Set(w.Template.Labels)) {
			t.Errorf("topology spread on %s: selector %v does not select the pods", c.TopologyKey, c.LabelSelector)
		}
		if c.LabelSelector != nil {
			for _, k := range c.MatchLabelKeys {
				if _, dup := c.LabelSelector.MatchLabels[k]; dup {
					t.Errorf("topology spread on %s: key %s in both labelSelector and matchLabelKeys (the API refuses it)", c.TopologyKey, k)
				}
			}
		}
		hard := c.WhenUnsatisfiable == corev1.DoNotSchedule
		switch c.TopologyKey {
		case "topology.kubernetes.io/zone":
			zone = true
			if production && !hard {
				t.Error("production: zone spreading is not DoNotSchedule")
			}
		case "kubernetes.io/hostname":
			host = true
			if production && role != "kms" && !hard {
				t.Error("production: key holders of one set may share a node (hostname spreading not DoNotSchedule)")
			}
		}
	}
	if !zone || !host {
		t.Errorf("topology spread: zone %v, hostname %v; want both", zone, host)
	}
	// Persistent volumes: the Raft state of root KMS replicas, the public
	// manifest and audit log of distributors; KMS servers have none.
	switch role {
	case "rootkms", "distributor":
		if w.Kind != "StatefulSet" || len(w.Claims) != 1 {
			t.Errorf("%s: want a StatefulSet with one volume claim, got %s with %d", role, w.Kind, len(w.Claims))
		}
	case "kms":
		if w.Kind != "Deployment" {
			t.Errorf("kms: want a Deployment, got %s", w.Kind)
		}
	}
	if role == "distributor" {
		// No volume for key material: the RMK lives in RAM only.
		var names []string
		for _, v := range spec.Volumes {
			names = append(names, v.Name)
		}
		slices.Sort(names)
		want := []string{"spiffe-helper-config", "spiffe-workload-api", "svid", "tmp"}
		if !slices.Equal(names, want) || w.Claims[0].Name != "state" {
			t.Errorf("distributor volumes = %v + claim %s, want %v + claim state (manifest and audit log)", names, w.Claims[0].Name, want)
		}
	}
}

func checkContainer(t *testing.T, c corev1.Container, wantAdd []corev1.Capability) {
	sc := c.SecurityContext
	if sc == nil {
		t.Errorf("container %s: no securityContext", c.Name)
		return
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("container %s: allowPrivilegeEscalation is not false", c.Name)
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Errorf("container %s: readOnlyRootFilesystem is not true", c.Name)
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Errorf("container %s: privileged", c.Name)
	}
	if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("container %s: capabilities do not drop ALL", c.Name)
	} else if !slices.Equal(sc.Capabilities.Add, wantAdd) {
		t.Errorf("container %s: capabilities add %v, want %v", c.Name, sc.Capabilities.Add, wantAdd)
	}
	for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		req, okReq := c.Resources.Requests[r]
		lim, okLim := c.Resources.Limits[r]
		if !okReq || !okLim || req.IsZero() {
			t.Errorf("container %s: %s request and limit = %v, %v; want both", c.Name, r, req.String(), lim.String())
		} else if req.Cmp(lim) > 0 {
			t.Errorf("container %s: %s request %s above its limit %s", c.Name, r, req.String(), lim.String())
		}
	}
	for _, e := range c.Env {
		if e.Value != "" {
			t.Errorf("container %s: env %s has a literal value; configuration comes from flags and ConfigMaps", c.Name, e.Name)
		}
	}
}

func find[T any](t *testing.T, list []T, name string, nameOf func(T) string) T {
	t.Helper()
	for _, x := range list {
		if nameOf(x) == name {
			return x
		}
	}
	var zero T
	t.Fatalf("no object named %s", name)
	return zero
}

func workload(t *testing.T, objs *Objects, name string) Workload {
	t.Helper()
	return find(t, objs.Workloads(), name, func(w Workload) string { return w.Name })
}

// podDNS lists <name>-<i>.<service>.$(POD_NAMESPACE).svc:<port> for every
// replica of a StatefulSet.
func podDNS(w Workload, service string, port int) []string {
	var out []string
	for i := range int(*w.Replicas) {
		out = append(out, fmt.Sprintf("%s-%d.%s.$(POD_NAMESPACE).svc:%d", w.Name, i, service, port))
	}
	return out
}

func flagValue(t *testing.T, w Workload, flag string) string {
	t.Helper()
	for _, a := range w.Template.Spec.Containers[0].Args {
		if v, ok := strings.CutPrefix(a, "--"+flag+"="); ok {
			return v
		}
	}
	t.Fatalf("%s: no --%s", w.Name, flag)
	return ""
}

func checkDistributors(t *testing.T, objs *Objects) {
	d := workload(t, objs, "distributor")
	if d.Replicas == nil || *d.Replicas < 3 {
		t.Errorf("distributors = %v, want at least 3", d.Replicas)
	}
	if got, want := flagValue(t, d, "peers"), strings.Join(podDNS(d, "distributor-peers", 7101), ","); got != want {
		t.Errorf("distributor --peers = %s\nwant every replica: %s", got, want)
	}
	peers := find(t, objs.Services, "distributor-peers", func(s corev1.Service) string { return s.Name })
	if peers.Spec.ClusterIP != corev1.ClusterIPNone || !peers.Spec.PublishNotReadyAddresses {
		t.Error("distributor-peers is not headless with not-ready addresses (sealed distributors must be reachable)")
	}
	checkPDB(t, objs, "distributor", []Workload{d}, 1)
}

func checkVoters(t *testing.T, objs *Objects) {
	seed, voter := workload(t, objs, "rootkms-seed"), workload(t, objs, "rootkms-voter")
	n := *seed.Replicas + *voter.Replicas
	if *seed.Replicas != 1 || n%2 != 1 || n < 3 {
		t.Errorf("voters: seed %d + voters %d, want 1 seed and an odd total of at least 3", *seed.Replicas, *voter.Replicas)
	}
	if !slices.Contains(seed.Template.Spec.Containers[0].Args, "--bootstrap") {
		t.Error("rootkms-seed does not --bootstrap")
	}
	want := strings.Join(slices.Concat(podDNS(seed, "rootkms-peers", 7201), podDNS(voter, "rootkms-peers", 7201)), ",")
	if got := flagValue(t, voter, "join"); got != want {
		t.Errorf("rootkms-voter --join = %s\nwant every voter: %s", got, want)
	}
	for _, w := range []Workload{seed, voter} {
		if w.Template.Labels["cairn.dev/raft"] != "voter" {
			t.Errorf("%s: cairn.dev/raft = %q, want voter", w.Name, w.Template.Labels["cairn.dev/raft"])
		}
	}
	peers := find(t, objs.Services, "rootkms-peers", func(s corev1.Service) string { return s.Name })
	if peers.Spec.ClusterIP != corev1.ClusterIPNone || !peers.Spec.PublishNotReadyAddresses {
		t.Error("rootkms-peers is not headless with not-ready addresses (Raft peers find each other before ready)")
	}
	for _, w := range []Workload{seed, voter} {
		sts := find(t, objs.StatefulSets, w.Name, func(s appsStatefulSet) string { return s.Name })
		if sts.Spec.ServiceName != "rootkms-peers" {
			t.Errorf("%s serviceName = %s, want rootkms-peers", w.Name, sts.Spec.ServiceName)
		}
	}
	// Quorum: with maxUnavailable voters down, a majority remains.
	pdb := checkPDB(t, objs, "rootkms-voters", []Workload{seed, voter}, 1)
	if pdb.Spec.MaxUnavailable == nil || n-pdb.Spec.MaxUnavailable.IntVal < n/2+1 {
		t.Errorf("rootkms-voters PDB maxUnavailable %v of %d voters loses quorum", pdb.Spec.MaxUnavailable, n)
	}
}

func checkRegion(t *testing.T, objs *Objects, region string) {
	nv := workload(t, objs, "rootkms-nonvoter-"+region)
	kms := workload(t, objs, "kms-"+region)
	for _, w := range []Workload{nv, kms} {
		if got := w.Template.Labels["cairn.dev/region"]; got != region {
			t.Errorf("%s: cairn.dev/region = %q, want %q", w.Name, got, region)
		}
	}
	if !slices.Contains(nv.Template.Spec.Containers[0].Args, "--non-voter") || nv.Template.Labels["cairn.dev/raft"] != "nonvoter" {
		t.Errorf("%s is not a non-voter", nv.Name)
	}
	if got, want := flagValue(t, nv, "join"), flagValue(t, workload(t, objs, "rootkms-voter"), "join"); got != want {
		t.Errorf("%s --join = %s, want the voters: %s", nv.Name, got, want)
	}
	checkPDB(t, objs, "rootkms-nonvoter-"+region, []Workload{nv}, 1)
	checkPDB(t, objs, "kms-"+region, []Workload{kms}, 1)
	hpa := find(t, objs.HPAs, "kms-"+region, func(h autoscalingHPA) string { return h.Name })
	if ref := hpa.Spec.ScaleTargetRef; ref.Kind != "Deployment" || ref.Name != kms.Name {
		t.Errorf("HPA kms-%s scales %s/%s, want Deployment/%s", region, ref.Kind, ref.Name, kms.Name)
	}
	if hpa.Spec.MinReplicas == nil || *hpa.Spec.MinReplicas < 1 || hpa.Spec.MaxReplicas < *hpa.Spec.MinReplicas {
		t.Errorf("HPA kms-%s replicas %v..%d", region, hpa.Spec.MinReplicas, hpa.Spec.MaxReplicas)
	}
	svc := find(t, objs.Services, "kms-"+region, func(s corev1.Service) string { return s.Name })
	if !labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(kms.Template.Labels)) {
		t.Errorf("Service kms-%s does not select the region's KMS pods", region)
	}
	// A region's objects select only its own pods.
	for _, other := range objs.Workloads() {
		if other.Name == kms.Name || other.Template.Labels[RoleLabel] != "kms" {
			continue
		}
		if labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(other.Template.Labels)) {
			t.Errorf("Service kms-%s also selects %s", region, other.Name)
		}
	}
	want := "rootkms-nonvoter-$(CAIRN_REGION).$(POD_NAMESPACE).svc:7201,rootkms.$(POD_NAMESPACE).svc:7201"
	if got := flagValue(t, kms, "rootkms"); got != want {
		t.Errorf("kms-%s --rootkms = %s, want %s", region, got, want)
	}
	find(t, objs.Services, "rootkms-nonvoter-"+region, func(s corev1.Service) string { return s.Name })
}

// checkPDB checks that the named PDB selects exactly the pods of ws and
// allows maxUnavailable voluntary disruptions.
func checkPDB(t *testing.T, objs *Objects, name string, ws []Workload, maxUnavailable int32) policyPDB {
	t.Helper()
	pdb := find(t, objs.PDBs, name, func(p policyPDB) string { return p.Name })
	if pdb.Spec.MaxUnavailable == nil || pdb.Spec.MaxUnavailable.IntVal != maxUnavailable || pdb.Spec.MinAvailable != nil {
		t.Errorf("PDB %s: maxUnavailable %v, minAvailable %v; want maxUnavailable %d", name, pdb.Spec.MaxUnavailable, pdb.Spec.MinAvailable, maxUnavailable)
	}
	sel, err := metav1.LabelSelectorAsSelector(pdb.Spec.Selector)
	if err != nil {
		t.Fatalf("PDB %s: %v", name, err)
	}
	for _, w := range objs.Workloads() {
		in := slices.ContainsFunc(ws, func(x Workload) bool { return x.Name == w.Name })
		if got := sel.Matches(labels.Set(w.Template.Labels)); got != in {
			t.Errorf("PDB %s selects %s = %v, want %v", name, w.Name, got, in)
		}
	}
	return pdb
}

// checkReferences: every Service selects a workload and names its ports;
// every ConfigMap and ServiceAccount a pod uses exists, except the two the
// operator creates (the genesis manifest and the bundle-signing keys).
func checkReferences(t *testing.T, objs *Objects) {
	ws := objs.Workloads()
	for _, s := range objs.Services {
		var sel []Workload
		for _, w := range ws {
			if labels.SelectorFromSet(s.Spec.Selector).Matches(labels.Set(w.Template.Labels)) {
				sel = append(sel, w)
			}
		}
		if len(sel) == 0 {
			t.Errorf("Service %s selects no workload", s.Name)
		}
		for _, p := range s.Spec.Ports {
			for _, w := range sel {
				if !slices.ContainsFunc(w.Template.Spec.Containers[0].Ports, func(cp corev1.ContainerPort) bool {
					return cp.Name == p.TargetPort.String() && cp.ContainerPort == p.Port
				}) {
					t.Errorf("Service %s port %s: %s has no container port %s = %d", s.Name, p.Name, w.Name, p.TargetPort.String(), p.Port)
				}
			}
		}
	}
	cms := map[string]bool{"cairn-genesis": true, "cairn-bundle-signing": true}
	for _, c := range objs.ConfigMaps {
		cms[c.Name] = true
	}
	sas := map[string]bool{}
	for _, s := range objs.ServiceAccounts {
		sas[s.Name] = true
	}
	for _, w := range ws {
		if !sas[w.Template.Spec.ServiceAccountName] {
			t.Errorf("%s: service account %q does not exist", w.Name, w.Template.Spec.ServiceAccountName)
		}
		for _, v := range w.Template.Spec.Volumes {
			if v.ConfigMap != nil && !cms[v.ConfigMap.Name] {
				t.Errorf("%s: volume %s: ConfigMap %s does not exist", w.Name, v.Name, v.ConfigMap.Name)
			}
		}
		for _, e := range w.Template.Spec.Containers[0].Env {
			if r := e.ValueFrom; r != nil && r.ConfigMapKeyRef != nil && !cms[r.ConfigMapKeyRef.Name] {
				t.Errorf("%s: env %s: ConfigMap %s does not exist", w.Name, e.Name, r.ConfigMapKeyRef.Name)
			}
		}
	}
}
