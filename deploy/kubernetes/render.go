// Package kubernetes renders Cairn's kustomize overlays and checks them: the
// workloads' security properties, and that the NetworkPolicies allow exactly
// the trust graph (see netpol.go). It is its own module so the Kubernetes
// API types stay out of Cairn's go.mod; the manifests live beside it.
package kubernetes

import (
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// Objects are the rendered objects of one overlay, decoded into the
// Kubernetes API types, by kind.
type Objects struct {
	Namespaces      []corev1.Namespace
	ServiceAccounts []corev1.ServiceAccount
	ConfigMaps      []corev1.ConfigMap
	Services        []corev1.Service
	StatefulSets    []appsv1.StatefulSet
	Deployments     []appsv1.Deployment
	PDBs            []policyv1.PodDisruptionBudget
	HPAs            []autoscalingv2.HorizontalPodAutoscaler
	NetworkPolicies []networkingv1.NetworkPolicy
	// YAML is every rendered object as kustomize printed it.
	YAML []string
}

// LoadTree copies the files under dir on disk into an in-memory file system
// at the same absolute path, so a test can add or change files without
// touching the tree, and kustomize reads nothing else.
func LoadTree(dir string) (filesys.FileSystem, string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, "", err
	}
	mem := filesys.MakeFsInMemory()
	err = filepath.WalkDir(abs, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return mem.MkdirAll(path)
		}
		if !strings.HasSuffix(path, ".yaml") {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return mem.WriteFile(path, b)
	})
	if err != nil {
		return nil, "", fmt.Errorf("kubernetes: loading %s: %w", dir, err)
	}
	return mem, abs, nil
}

// Render builds the kustomization in dir of fsys with kustomize's krusty
// API (no plugins, no network, files under each kustomization root only)
// and decodes every object strictly: an unknown or duplicate field, or a
// kind this package does not know, is an error.
func Render(fsys filesys.FileSystem, dir string) (*Objects, error) {
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	rm, err := k.Run(fsys, dir)
	if err != nil {
		return nil, fmt.Errorf("kubernetes: kustomize build %s: %w", dir, err)
	}
	var out Objects
	for _, r := range rm.Resources() {
		b, err := r.AsYAML()
		if err != nil {
			return nil, fmt.Errorf("kubernetes: %s: %w", r.CurId(), err)
		}
		out.YAML = append(out.YAML, string(b))
		if err := out.decode(r.GetKind(), r.GetApiVersion(), b); err != nil {
			return nil, fmt.Errorf("kubernetes: %s %s: %w", r.GetKind(), r.GetName(), err)
		}
	}
	return &out, nil
}

func (o *Objects) decode(kind, apiVersion string, b []byte) error {
	var err error
	switch kind + " " + apiVersion {
	case "Namespace v1":
		err = decodeInto(b, &o.Namespaces)
	case "ServiceAccount v1":
		err = decodeInto(b, &o.ServiceAccounts)
	case "ConfigMap v1":
		err = decodeInto(b, &o.ConfigMaps)
	case "Service v1":
		err = decodeInto(b, &o.Services)
	case "StatefulSet apps/v1":
		err = decodeInto(b, &o.StatefulSets)
	case "Deployment apps/v1":
		err = decodeInto(b, &o.Deployments)
	case "PodDisruptionBudget policy/v1":
		err = decodeInto(b, &o.PDBs)
	case "HorizontalPodAutoscaler autoscaling/v2":
		err = decodeInto(b, &o.HPAs)
	case "NetworkPolicy networking.k8s.io/v1":
		err = decodeInto(b, &o.NetworkPolicies)
	default:
		return fmt.Errorf("unexpected kind %s %s (a Secret or other object this check does not know)", apiVersion, kind)
	}
	return err
}

// decodeInto decodes one object strictly and appends it to list.
func decodeInto[T any](b []byte, list *[]T) error {
	var v T
	if err := yaml.UnmarshalStrict(b, &v); err != nil {
		return err
	}
	*list = append(*list, v)
	return nil
}

// Workload is a StatefulSet or a Deployment, as the checks see it.
type Workload struct {
	Kind, Name, Namespace string
	Replicas              *int32
	Selector              *metav1.LabelSelector
	Template              corev1.PodTemplateSpec
	// Claims are a StatefulSet's volume claim templates.
	Claims []corev1.PersistentVolumeClaim
}

// Workloads returns the StatefulSets, then the Deployments.
func (o *Objects) Workloads() []Workload {
	var ws []Workload
	for _, s := range o.StatefulSets {
		ws = append(ws, Workload{Kind: "StatefulSet", Name: s.Name, Namespace: s.Namespace, Replicas: s.Spec.Replicas,
			Selector: s.Spec.Selector, Template: s.Spec.Template, Claims: s.Spec.VolumeClaimTemplates})
	}
	for _, d := range o.Deployments {
		ws = append(ws, Workload{Kind: "Deployment", Name: d.Name, Namespace: d.Namespace, Replicas: d.Spec.Replicas,
			Selector: d.Spec.Selector, Template: d.Spec.Template})
	}
	return ws
}

// Pods returns one Pod per workload, governed by the policies of its
// namespace, with its role label, its containers' ports and an IP of
// 10.244.0.0/16.
func (o *Objects) Pods() []Pod {
	var pods []Pod
	for i, w := range o.Workloads() {
		var ports []corev1.ContainerPort
		for _, c := range slices.Concat(w.Template.Spec.InitContainers, w.Template.Spec.Containers) {
			ports = append(ports, c.Ports...)
		}
		pods = append(pods, Pod{
			Role: w.Template.Labels[RoleLabel], Namespace: w.Namespace, Labels: w.Template.Labels,
			IP: netip.AddrFrom4([4]byte{10, 244, byte(i / 250), byte(1 + i%250)}), Ports: ports, Governed: true,
		})
	}
	return pods
}
