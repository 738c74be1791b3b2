package kubernetes

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// RoleLabel is the pod label that names a pod's place in the trust graph.
const RoleLabel = "cairn.dev/role"

// AnyPort is the port an edge is reported on when a policy allows a peer
// on every port: no Cairn pod listens on it, so an edge on it is a rule
// without a port list.
const AnyPort = 65000

// Pod is one kind of pod the NetworkPolicies are evaluated for: a Cairn
// workload's pods, or a caller defined by the test (a client, Prometheus,
// kube-dns, a stranger).
type Pod struct {
	// Role names the pod in edges.
	Role string
	// Namespace and NamespaceLabels place it; the namespace's
	// kubernetes.io/metadata.name label is implied.
	Namespace       string
	NamespaceLabels map[string]string
	Labels          map[string]string
	// IP is matched by ipBlock peers.
	IP netip.Addr
	// Ports are the ports it listens on (named ports resolve against them).
	Ports []corev1.ContainerPort
	// Governed says the policies of Namespace apply to it; pods of other
	// namespaces are subject to policies this check does not see, so an
	// edge between two ungoverned pods is not reported.
	Governed bool
}

// Edge is one allowed connection: a pod of role From may open a connection
// to a pod of role To on Port/Protocol.
type Edge struct {
	From, To string
	Port     int32
	Protocol corev1.Protocol
}

func (e Edge) String() string {
	return fmt.Sprintf("%s -> %s %d/%s", e.From, e.To, e.Port, e.Protocol)
}

// Edges computes every connection the policies allow between the pods, as
// Kubernetes decides it: a pod selected by a policy of an ingress (egress)
// type is isolated in that direction, and then admits only what one of
// those policies' rules allows; a connection needs both the source's
// egress and the destination's ingress. Each destination is tried on its
// declared ports, on every port number a policy names (a pod outside the
// namespace may listen on any), and on AnyPort (TCP and UDP).
func Edges(policies []networkingv1.NetworkPolicy, pods []Pod) ([]Edge, error) {
	named := policyPorts(policies)
	seen := map[Edge]bool{}
	for _, src := range pods {
		for _, dst := range pods {
			if !src.Governed && !dst.Governed {
				continue
			}
			for _, p := range candidatePorts(dst, named) {
				out, err := allows(policies, networkingv1.PolicyTypeEgress, src, dst, p)
				if err != nil {
					return nil, err
				}
				in, err := allows(policies, networkingv1.PolicyTypeIngress, dst, src, p)
				if err != nil {
					return nil, err
				}
				if out && in {
					seen[Edge{From: src.Role, To: dst.Role, Port: p.ContainerPort, Protocol: p.Protocol}] = true
				}
			}
		}
	}
	edges := make([]Edge, 0, len(seen))
	for e := range seen {
		edges = append(edges, e)
	}
	SortEdges(edges)
	return edges, nil
}

// SortEdges orders edges by from, to, port, protocol.
func SortEdges(edges []Edge) {
	slices.SortFunc(edges, func(a, b Edge) int {
		return cmp.Or(cmp.Compare(a.From, b.From), cmp.Compare(a.To, b.To),
			cmp.Compare(a.Port, b.Port), cmp.Compare(a.Protocol, b.Protocol))
	})
}

// CompareEdges returns an error listing every edge got has and want lacks
// (allowed outside the trust graph) and every edge want has and got lacks.
func CompareEdges(got, want []Edge) error {
	g, w := map[Edge]bool{}, map[Edge]bool{}
	for _, e := range got {
		g[e] = true
	}
	for _, e := range want {
		w[e] = true
	}
	var extra, missing []Edge
	for e := range g {
		if !w[e] {
			extra = append(extra, e)
		}
	}
	for e := range w {
		if !g[e] {
			missing = append(missing, e)
		}
	}
	if len(extra) == 0 && len(missing) == 0 {
		return nil
	}
	SortEdges(extra)
	SortEdges(missing)
	var b strings.Builder
	b.WriteString("kubernetes: the NetworkPolicies do not allow exactly the trust graph")
	for _, e := range extra {
		fmt.Fprintf(&b, "\n  allowed outside the trust graph: %s", e)
	}
	for _, e := range missing {
		fmt.Fprintf(&b, "\n  trust-graph edge not allowed: %s", e)
	}
	return fmt.Errorf("%s", b.String())
}

// policyPorts returns every numbered port (the first of a range) the
// policies' rules name.
func policyPorts(policies []networkingv1.NetworkPolicy) []corev1.ContainerPort {
	var out []corev1.ContainerPort
	add := func(ports []networkingv1.NetworkPolicyPort) {
		for _, p := range ports {
			if p.Port == nil || p.Port.Type != intstr.Int {
				continue
			}
			proto := corev1.ProtocolTCP
			if p.Protocol != nil {
				proto = *p.Protocol
			}
			out = append(out, corev1.ContainerPort{ContainerPort: p.Port.IntVal, Protocol: proto})
		}
	}
	for _, np := range policies {
		for _, r := range np.Spec.Ingress {
			add(r.Ports)
		}
		for _, r := range np.Spec.Egress {
			add(r.Ports)
		}
	}
	return out
}

func candidatePorts(dst Pod, named []corev1.ContainerPort) []corev1.ContainerPort {
	ports := []corev1.ContainerPort{
		{Name: "", ContainerPort: AnyPort, Protocol: corev1.ProtocolTCP},
		{Name: "", ContainerPort: AnyPort, Protocol: corev1.ProtocolUDP},
	}
	ports = append(ports, named...)
	for _, p := range dst.Ports {
		if p.Protocol == "" {
			p.Protocol = corev1.ProtocolTCP
		}
		ports = append(ports, p)
	}
	return ports
}

// allows reports whether the policies let self (isolated or not in the
// direction dir) exchange a connection with peer on port: for egress self
// is the source and port is the peer's; for ingress self is the
// destination and port is its own.
func allows(policies []networkingv1.NetworkPolicy, dir networkingv1.PolicyType, self, peer Pod, port corev1.ContainerPort) (bool, error) {
	if !self.Governed {
		return true, nil
	}
	isolated := false
	for _, np := range policies {
		if np.Namespace != self.Namespace || !hasType(np, dir) {
			continue
		}
		sel, err := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
		if err != nil {
			return false, fmt.Errorf("kubernetes: NetworkPolicy %s: podSelector: %w", np.Name, err)
		}
		if !sel.Matches(labels.Set(self.Labels)) {
			continue
		}
		isolated = true
		var rules [][]networkingv1.NetworkPolicyPeer
		var rulePorts [][]networkingv1.NetworkPolicyPort
		if dir == networkingv1.PolicyTypeIngress {
			for _, r := range np.Spec.Ingress {
				rules, rulePorts = append(rules, r.From), append(rulePorts, r.Ports)
			}
		} else {
			for _, r := range np.Spec.Egress {
				rules, rulePorts = append(rules, r.To), append(rulePorts, r.Ports)
			}
		}
		for i := range rules {
			okPeer, err := peersMatch(np, rules[i], peer)
			if err != nil {
				return false, err
			}
			if okPeer && portsMatch(rulePorts[i], port) {
				return true, nil
			}
		}
	}
	return !isolated, nil
}

// hasType applies the API's defaulting: no policyTypes means Ingress, plus
// Egress if the policy has egress rules.
func hasType(np networkingv1.NetworkPolicy, t networkingv1.PolicyType) bool {
	types := np.Spec.PolicyTypes
	if len(types) == 0 {
		types = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
		if len(np.Spec.Egress) > 0 {
			types = append(types, networkingv1.PolicyTypeEgress)
		}
	}
	return slices.Contains(types, t)
}

// peersMatch: an empty peer list matches everyone; otherwise one peer must.
func peersMatch(np networkingv1.NetworkPolicy, peers []networkingv1.NetworkPolicyPeer, p Pod) (bool, error) {
	if len(peers) == 0 {
		return true, nil
	}
	for _, peer := range peers {
		ok, err := peerMatches(np, peer, p)
		if err != nil || ok {
			return ok, err
		}
	}
	return false, nil
}

func peerMatches(np networkingv1.NetworkPolicy, peer networkingv1.NetworkPolicyPeer, p Pod) (bool, error) {
	if peer.IPBlock != nil {
		if peer.PodSelector != nil || peer.NamespaceSelector != nil {
			return false, fmt.Errorf("kubernetes: NetworkPolicy %s: an ipBlock peer with a selector", np.Name)
		}
		cidr, err := netip.ParsePrefix(peer.IPBlock.CIDR)
		if err != nil {
			return false, fmt.Errorf("kubernetes: NetworkPolicy %s: ipBlock %q: %w", np.Name, peer.IPBlock.CIDR, err)
		}
		if !p.IP.IsValid() || !cidr.Contains(p.IP) {
			return false, nil
		}
		for _, ex := range peer.IPBlock.Except {
			e, err := netip.ParsePrefix(ex)
			if err != nil {
				return false, fmt.Errorf("kubernetes: NetworkPolicy %s: ipBlock except %q: %w", np.Name, ex, err)
			}
			if e.Contains(p.IP) {
				return false, nil
			}
		}
		return true, nil
	}
	if peer.NamespaceSelector == nil {
		if p.Namespace != np.Namespace {
			return false, nil
		}
	} else {
		sel, err := metav1.LabelSelectorAsSelector(peer.NamespaceSelector)
		if err != nil {
			return false, fmt.Errorf("kubernetes: NetworkPolicy %s: namespaceSelector: %w", np.Name, err)
		}
		nsLabels := labels.Set{"kubernetes.io/metadata.name": p.Namespace}
		for k, v := range p.NamespaceLabels {
			nsLabels[k] = v
		}
		if !sel.Matches(nsLabels) {
			return false, nil
		}
	}
	if peer.PodSelector == nil {
		return true, nil
	}
	sel, err := metav1.LabelSelectorAsSelector(peer.PodSelector)
	if err != nil {
		return false, fmt.Errorf("kubernetes: NetworkPolicy %s: podSelector: %w", np.Name, err)
	}
	return sel.Matches(labels.Set(p.Labels)), nil
}

// portsMatch: an empty port list matches every port; a named port matches
// the destination's container port of that name.
func portsMatch(ports []networkingv1.NetworkPolicyPort, port corev1.ContainerPort) bool {
	if len(ports) == 0 {
		return true
	}
	for _, p := range ports {
		proto := corev1.ProtocolTCP
		if p.Protocol != nil {
			proto = *p.Protocol
		}
		if proto != port.Protocol {
			continue
		}
		if p.Port == nil {
			return true
		}
		if p.Port.Type == intstr.String {
			if p.Port.StrVal == port.Name {
				return true
			}
			continue
		}
		lo, hi := p.Port.IntVal, p.Port.IntVal
		if p.EndPort != nil {
			hi = *p.EndPort
		}
		if port.ContainerPort >= lo && port.ContainerPort <= hi {
			return true
		}
	}
	return false
}
