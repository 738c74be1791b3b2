package kubernetes

import (
	"os"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"
)

// clusterSPIFFEID is the part of the SPIRE Controller Manager's
// ClusterSPIFFEID this deployment uses (decoded strictly).
type clusterSPIFFEID struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   metav1.ObjectMeta `json:"metadata"`
	Spec       struct {
		SPIFFEIDTemplate  string                `json:"spiffeIDTemplate"`
		NamespaceSelector *metav1.LabelSelector `json:"namespaceSelector"`
		PodSelector       *metav1.LabelSelector `json:"podSelector"`
	} `json:"spec"`
}

// TestClusterSPIFFEIDCoversEveryWorkload: every Cairn pod gets an SVID of
// Cairn's shape, <role>/<region>/<pod name>.
func TestClusterSPIFFEIDCoversEveryWorkload(t *testing.T) {
	b, err := os.ReadFile("spire/clusterspiffeid.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var c clusterSPIFFEID
	if err := yaml.UnmarshalStrict(b, &c); err != nil {
		t.Fatal(err)
	}
	if c.APIVersion != "spire.spiffe.io/v1alpha1" || c.Kind != "ClusterSPIFFEID" {
		t.Fatalf("kind = %s %s, want spire.spiffe.io/v1alpha1 ClusterSPIFFEID", c.APIVersion, c.Kind)
	}
	wantTmpl := `spiffe://{{ .TrustDomain }}/{{ index .PodMeta.Labels "cairn.dev/role" }}/{{ index .PodMeta.Labels "cairn.dev/region" }}/{{ .PodMeta.Name }}`
	if c.Spec.SPIFFEIDTemplate != wantTmpl {
		t.Errorf("spiffeIDTemplate = %s, want %s", c.Spec.SPIFFEIDTemplate, wantTmpl)
	}
	pods, err := metav1.LabelSelectorAsSelector(c.Spec.PodSelector)
	if err != nil {
		t.Fatal(err)
	}
	nss, err := metav1.LabelSelectorAsSelector(c.Spec.NamespaceSelector)
	if err != nil {
		t.Fatal(err)
	}
	fsys, root := loadTree(t)
	for _, o := range overlays {
		objs := render(t, fsys, root, o.name)
		for _, w := range objs.Workloads() {
			if !pods.Matches(labels.Set(w.Template.Labels)) || !nss.Matches(labels.Set{"kubernetes.io/metadata.name": w.Namespace}) {
				t.Errorf("%s/%s: the ClusterSPIFFEID does not select its pods", o.name, w.Name)
			}
			for _, k := range []string{"cairn.dev/role", "cairn.dev/region"} {
				if v := w.Template.Labels[k]; v == "" || strings.Contains(v, "/") {
					t.Errorf("%s/%s: label %s = %q, want one SPIFFE ID path segment", o.name, w.Name, k, v)
				}
			}
		}
	}
}
