// yamlcanon prints the Kubernetes objects of a multi-document YAML stream (stdin) in one
// canonical form: each object as indented JSON with sorted keys (so a diff shows the
// field that differs), sorted by kind, namespace and name. Two renders of the same objects print the same bytes, whatever their
// key order, comments or document order (scripts/lib/deploy.sh compares the kustomize
// overlays with the Helm chart this way).
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"

	"sigs.k8s.io/yaml"
)

func main() {
	pods := flag.Bool("pods", false, "print a Pod for each workload's pod template")
	kind := flag.String("kind", "", "print only the objects of this kind")
	flag.Parse()
	in, err := io.ReadAll(bufio.NewReader(os.Stdin))
	if err != nil {
		fail(err)
	}
	type object struct{ key, line string }
	var objects []object
	for _, doc := range splitDocuments(in) {
		j, err := yaml.YAMLToJSON(doc)
		if err != nil {
			fail(err)
		}
		var v map[string]any
		if err := json.Unmarshal(j, &v); err != nil {
			fail(err)
		}
		if len(v) == 0 {
			continue
		}
		if *kind != "" && v["kind"] != *kind {
			continue
		}
		if *pods {
			pod, ok := podOf(v)
			if !ok {
				continue
			}
			v = pod
		}
		line, err := json.MarshalIndent(v, "", "  ") // map keys come out sorted
		if err != nil {
			fail(err)
		}
		meta, _ := v["metadata"].(map[string]any)
		key := fmt.Sprintf("%v/%v/%v/%v", v["apiVersion"], v["kind"], meta["namespace"], meta["name"])
		objects = append(objects, object{key, string(line)})
	}
	sort.Slice(objects, func(i, j int) bool { return objects[i].key < objects[j].key })
	out := bufio.NewWriter(os.Stdout)
	for _, o := range objects {
		if *pods || *kind != "" {
			fmt.Fprintln(out, "---") // a stream kubectl reads as documents
		}
		fmt.Fprintln(out, o.line)
	}
	if err := out.Flush(); err != nil {
		fail(err)
	}
}

// podOf makes a Pod of a workload's pod template (named after the workload).
func podOf(v map[string]any) (map[string]any, bool) {
	switch v["kind"] {
	case "Deployment", "StatefulSet", "DaemonSet", "Job":
	default:
		return nil, false
	}
	spec, _ := v["spec"].(map[string]any)
	template, _ := spec["template"].(map[string]any)
	if template == nil {
		return nil, false
	}
	meta, _ := v["metadata"].(map[string]any)
	podMeta, _ := template["metadata"].(map[string]any)
	if podMeta == nil {
		podMeta = map[string]any{}
	}
	podMeta["name"] = fmt.Sprintf("%v-template", meta["name"])
	podSpec, _ := template["spec"].(map[string]any)
	// A StatefulSet's claims become volumes of the pod (as its controller would mount them).
	if claims, ok := spec["volumeClaimTemplates"].([]any); ok && podSpec != nil {
		volumes, _ := podSpec["volumes"].([]any)
		for _, c := range claims {
			claim, _ := c.(map[string]any)
			claimMeta, _ := claim["metadata"].(map[string]any)
			volumes = append(volumes, map[string]any{
				"name":     claimMeta["name"],
				"emptyDir": map[string]any{},
			})
		}
		podSpec["volumes"] = volumes
	}
	if ns, ok := meta["namespace"]; ok {
		podMeta["namespace"] = ns
	}
	return map[string]any{
		"apiVersion": "v1",
		"kind":       "Pod",
		"metadata":   podMeta,
		"spec":       template["spec"],
	}, true
}

// splitDocuments splits a YAML stream at its `---` lines.
func splitDocuments(in []byte) [][]byte {
	var docs [][]byte
	var current bytes.Buffer
	for _, line := range strings.SplitAfter(string(in), "\n") {
		if strings.TrimRight(line, " \t\r\n") == "---" {
			docs = append(docs, append([]byte(nil), current.Bytes()...))
			current.Reset()
			continue
		}
		current.WriteString(line)
	}
	return append(docs, current.Bytes())
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "yamlcanon:", err)
	os.Exit(1)
}
