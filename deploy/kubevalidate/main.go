// kubevalidate checks rendered Kubernetes manifests offline against the typed API of one
// Kubernetes version (the k8s.io/api version pinned in go.mod): every document is decoded strictly
// into its Go type, so an unknown or misspelt field, a wrong type or an unknown kind/apiVersion is
// an error. Custom resources whose types are not compiled in (ServiceMonitor, ScaledObject) get a
// structural check of the fields the chart relies on.
//
// Usage: kubevalidate FILE...   (multi-document YAML, e.g. the output of `helm template`)
package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	apiregistrationv1 "k8s.io/kube-aggregator/pkg/apis/apiregistration/v1"
	"sigs.k8s.io/yaml"
)

// customResources are checked structurally: apiVersion/kind → top-level spec keys that must be there.
var customResources = map[schema.GroupVersionKind][]string{
	{Group: "monitoring.coreos.com", Version: "v1", Kind: "ServiceMonitor"}: {"selector", "endpoints"},
	{Group: "keda.sh", Version: "v1alpha1", Kind: "ScaledObject"}:           {"scaleTargetRef", "triggers"},
}

func newScheme() *runtime.Scheme {
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{
		appsv1.AddToScheme, autoscalingv2.AddToScheme, batchv1.AddToScheme, corev1.AddToScheme,
		networkingv1.AddToScheme, policyv1.AddToScheme, rbacv1.AddToScheme, apiregistrationv1.AddToScheme,
	} {
		if err := add(scheme); err != nil {
			panic(err)
		}
	}
	return scheme
}

type header struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name string `json:"name"`
	} `json:"metadata"`
	Spec map[string]any `json:"spec"`
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: kubevalidate FILE...")
		os.Exit(2)
	}
	scheme := newScheme()
	failures, checked, structural := 0, 0, 0
	for _, path := range os.Args[1:] {
		content, err := os.ReadFile(path)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", path, err)
			os.Exit(2)
		}
		reader := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(content)))
		for index := 0; ; index++ {
			doc, err := reader.Read()
			if err == io.EOF {
				break
			}
			if err != nil {
				fmt.Printf("%s: document %d: %v\n", path, index, err)
				failures++
				break
			}
			if len(bytes.TrimSpace(stripComments(doc))) == 0 {
				continue
			}
			var head header
			if err := yaml.Unmarshal(doc, &head); err != nil {
				fmt.Printf("%s: document %d: %v\n", path, index, err)
				failures++
				continue
			}
			where := fmt.Sprintf("%s: %s %s", path, head.Kind, head.Metadata.Name)
			if head.Metadata.Name == "" {
				fmt.Printf("%s: metadata.name is missing\n", where)
				failures++
			}
			gvk := schema.FromAPIVersionAndKind(head.APIVersion, head.Kind)
			if required, ok := customResources[gvk]; ok {
				for _, key := range required {
					if _, present := head.Spec[key]; !present {
						fmt.Printf("%s: spec.%s is missing\n", where, key)
						failures++
					}
				}
				structural++
				continue
			}
			object, err := scheme.New(gvk)
			if err != nil {
				fmt.Printf("%s: unknown kind %s for this Kubernetes version\n", where, gvk)
				failures++
				continue
			}
			if err := yaml.UnmarshalStrict(doc, object); err != nil {
				fmt.Printf("%s: %v\n", where, err)
				failures++
				continue
			}
			checked++
		}
	}
	fmt.Printf("kubevalidate: %d objects valid against the typed API, %d custom resources checked structurally, %d problems\n",
		checked, structural, failures)
	if failures > 0 {
		os.Exit(1)
	}
}

func stripComments(doc []byte) []byte {
	var kept []string
	for _, line := range strings.Split(string(doc), "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "#") {
			continue
		}
		kept = append(kept, line)
	}
	return []byte(strings.Join(kept, "\n"))
}
