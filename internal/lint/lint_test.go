// Package lint checks Cairn's house rules as a test (after pebble's
// internal/lint): rules the compiler and go vet cannot know about.
package lint

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// rule is one house rule, checked on one parsed file.
type rule struct {
	name string
	why  string
	// check returns a message per violation in the file. rel is the
	// slash-separated path from the module root; test reports a _test.go file.
	check func(rel string, test bool, f *ast.File) []string
}

// pkcs11Package is the one package allowed to use PKCS#11 (and cgo).
const pkcs11Package = "safe/pkcs11safe"

var rules = []rule{
	{
		name: "no-math-rand",
		why:  "keys, nonces and ids come from crypto/rand; math/rand is predictable",
		check: func(rel string, test bool, f *ast.File) []string {
			// Tests, and the harnesses under tests/ (nothing there ships;
			// a soak's fault schedule must replay from its seed), may use
			// a seeded generator.
			if test || strings.HasPrefix(rel, "tests/") {
				return nil
			}
			return importsAny(f, "math/rand", "math/rand/v2")
		},
	},
	{
		name: "pkcs11-one-package",
		why:  "PKCS#11 and cgo stay in " + pkcs11Package + " so everything else builds with CGO_ENABLED=0",
		check: func(rel string, test bool, f *ast.File) []string {
			if path.Dir(rel) == pkcs11Package {
				return nil
			}
			return importsAny(f, "github.com/miekg/pkcs11", "C")
		},
	},
	{
		name: "no-std-log",
		why:  "operational logs go through log/slog (audit records through internal/audit)",
		check: func(rel string, test bool, f *ast.File) []string {
			if test {
				return nil
			}
			return importsAny(f, "log")
		},
	},
	{
		name: "no-global-prometheus",
		why:  "each server owns a prometheus.Registry; the global registry leaks state between servers and tests",
		check: func(rel string, test bool, f *ast.File) []string {
			return selectorsAny(f, map[string][]string{
				"github.com/prometheus/client_golang/prometheus": {"MustRegister", "Register", "DefaultRegisterer", "DefaultGatherer"},
			})
		},
	},
}

func importsAny(f *ast.File, paths ...string) []string {
	var out []string
	for _, imp := range f.Imports {
		p, _ := strconv.Unquote(imp.Path.Value)
		if slices.Contains(paths, p) {
			out = append(out, fmt.Sprintf("imports %q", p))
		}
	}
	return out
}

// selectorsAny reports uses of pkg.Name for the given import paths and names,
// whatever the local import name.
func selectorsAny(f *ast.File, banned map[string][]string) []string {
	local := map[string][]string{}
	for _, imp := range f.Imports {
		p, _ := strconv.Unquote(imp.Path.Value)
		names, ok := banned[p]
		if !ok {
			continue
		}
		name := path.Base(p)
		if imp.Name != nil {
			name = imp.Name.Name
		}
		local[name] = names
	}
	var out []string
	ast.Inspect(f, func(n ast.Node) bool {
		sel, ok := n.(*ast.SelectorExpr)
		if !ok {
			return true
		}
		x, ok := sel.X.(*ast.Ident)
		if !ok {
			return true
		}
		if names, ok := local[x.Name]; ok && slices.Contains(names, sel.Sel.Name) {
			out = append(out, fmt.Sprintf("uses %s.%s", x.Name, sel.Sel.Name))
		}
		return true
	})
	return out
}

// checkSource applies every rule to one file.
func checkSource(rel string, src []byte) ([]string, error) {
	f, err := parser.ParseFile(token.NewFileSet(), rel, src, parser.SkipObjectResolution)
	if err != nil {
		return nil, err
	}
	test := strings.HasSuffix(rel, "_test.go")
	var out []string
	for _, r := range rules {
		for _, msg := range r.check(rel, test, f) {
			out = append(out, fmt.Sprintf("%s: %s %s (%s)", rel, r.name, msg, r.why))
		}
	}
	return out, nil
}

func moduleRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the test's directory")
		}
		dir = parent
	}
}

// TestHouseRules checks every Go file of the module.
func TestHouseRules(t *testing.T) {
	root := moduleRoot(t)
	var files int
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel := filepath.ToSlash(strings.TrimPrefix(p, root+string(filepath.Separator)))
		if d.IsDir() {
			switch {
			case p == root:
				return nil
			case strings.HasPrefix(d.Name(), "."), d.Name() == "testdata", d.Name() == "bin", rel == "tools":
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(p, ".go") {
			return nil
		}
		src, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		files++
		msgs, err := checkSource(rel, src)
		if err != nil {
			return err
		}
		for _, m := range msgs {
			t.Error(m)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if files < 10 {
		t.Fatalf("checked %d Go files under %s; the walk is broken", files, root)
	}
}

// TestRulesCatchViolations proves each rule fires (a lint that cannot fail is
// worse than none).
func TestRulesCatchViolations(t *testing.T) {
	tests := []struct {
		rel, src string
		want     string // rule name expected to fire; "" = clean
	}{
		{"kms/x.go", "package x\nimport \"math/rand\"\nvar _ = rand.Int", "no-math-rand"},
		{"kms/x.go", "package x\nimport r \"math/rand/v2\"\nvar _ = r.Int", "no-math-rand"},
		{"kms/x_test.go", "package x\nimport \"math/rand\"\nvar _ = rand.Int", ""},
		{"tests/chaos/x.go", "package chaos\nimport \"math/rand/v2\"\nvar _ = rand.IntN", ""},
		{"kmsclient/tests/x.go", "package x\nimport \"math/rand/v2\"\nvar _ = rand.IntN", "no-math-rand"},
		{"safe/x.go", "package safe\nimport \"github.com/miekg/pkcs11\"\nvar _ = pkcs11.New", "pkcs11-one-package"},
		{"safe/pkcs11safe/x.go", "package pkcs11safe\nimport \"github.com/miekg/pkcs11\"\nvar _ = pkcs11.New", ""},
		{"kms/x.go", "package x\nimport \"C\"", "pkcs11-one-package"},
		{"kms/x.go", "package x\nimport \"log\"\nfunc f() { log.Print() }", "no-std-log"},
		{"kms/x.go", "package x\nimport \"log/slog\"\nvar _ = slog.Info", ""},
		{"kms/x.go", "package x\nimport \"github.com/prometheus/client_golang/prometheus\"\nfunc f() { prometheus.MustRegister() }", "no-global-prometheus"},
		{"kms/x.go", "package x\nimport p \"github.com/prometheus/client_golang/prometheus\"\nvar _ = p.DefaultRegisterer", "no-global-prometheus"},
		{"kms/x.go", "package x\nimport \"github.com/prometheus/client_golang/prometheus\"\nvar _ = prometheus.NewRegistry", ""},
	}
	for _, tt := range tests {
		t.Run(tt.rel+"/"+tt.want, func(t *testing.T) {
			msgs, err := checkSource(tt.rel, []byte(tt.src))
			if err != nil {
				t.Fatal(err)
			}
			fired := len(msgs) > 0 && strings.Contains(strings.Join(msgs, "\n"), ": "+tt.want+" ")
			if tt.want == "" && len(msgs) != 0 {
				t.Errorf("checkSource(%s) = %q, want clean", tt.rel, msgs)
			}
			if tt.want != "" && !fired {
				t.Errorf("checkSource(%s) = %q, want rule %s to fire", tt.rel, msgs, tt.want)
			}
		})
	}
}
