package chain

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/cairnkms/cairn/internal/devca"
)

// TestREADMEClientSnippet checks that the README's kmsclient example talks
// to the chain `make up` starts: its endpoints are the KMS servers of the
// default port plan, region by region in order; its identity files are the
// us-east demo client's in the default state dir; its keyset is a demo
// keyset. The snippet is parsed as Go.
func TestREADMEClientSnippet(t *testing.T) {
	readme, err := os.ReadFile(filepath.Join("..", "..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	var snippet string
	for _, block := range strings.Split(string(readme), "```go\n")[1:] {
		block, _, _ = strings.Cut(block, "```")
		if strings.Contains(block, "kmsclient.New(") {
			snippet = block
			break
		}
	}
	if snippet == "" {
		t.Fatal("README.md has no ```go block calling kmsclient.New")
	}
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "README.md", "package snippet\nfunc _() {\n"+snippet+"}\n", 0)
	if err != nil {
		t.Fatalf("the README's kmsclient snippet does not parse as Go: %v\n%s", err, snippet)
	}

	// String variables assigned in the snippet (id := "..."), and string
	// expressions made of them and literals.
	vars := map[string]string{}
	var str func(ast.Expr) (string, bool)
	str = func(e ast.Expr) (string, bool) {
		switch e := e.(type) {
		case *ast.BasicLit:
			if e.Kind == token.STRING {
				s, err := strconv.Unquote(e.Value)
				return s, err == nil
			}
		case *ast.Ident:
			s, ok := vars[e.Name]
			return s, ok
		case *ast.BinaryExpr:
			if e.Op == token.ADD {
				a, ok1 := str(e.X)
				b, ok2 := str(e.Y)
				return a + b, ok1 && ok2
			}
		}
		return "", false
	}
	strs := func(call *ast.CallExpr) []string {
		var out []string
		for _, a := range call.Args {
			s, ok := str(a)
			if !ok {
				t.Fatalf("README snippet: argument %s of a call is not a string the test can read", fset.Position(a.Pos()))
			}
			out = append(out, s)
		}
		return out
	}
	endpoints := map[string][]string{}
	var regionOrder, identity, aeadArgs []string
	ast.Inspect(f, func(n ast.Node) bool {
		switch n := n.(type) {
		case *ast.AssignStmt:
			if len(n.Lhs) == 1 && len(n.Rhs) == 1 {
				if id, ok := n.Lhs[0].(*ast.Ident); ok {
					if s, ok := str(n.Rhs[0]); ok {
						vars[id.Name] = s
					}
				}
			}
		case *ast.CallExpr:
			sel, ok := n.Fun.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			switch sel.Sel.Name {
			case "WithEndpoints":
				args := strs(n)
				regionOrder = append(regionOrder, args[0])
				endpoints[args[0]] = args[1:]
			case "WithIdentityFiles":
				identity = strs(n)
			case "AEAD":
				aeadArgs = strs(n)
			}
		}
		return true
	})

	// What `make up` starts: the default base port and regions.
	plan := PortPlan(DefaultBasePort, DefaultRegions)
	want := map[string][]string{}
	for _, r := range DefaultRegions {
		for i := 1; i <= kmsPerRegion; i++ {
			j := slices.IndexFunc(plan, func(p Port) bool { return p.Component == kmsName(r, i) && p.Purpose == "gRPC" })
			if j < 0 {
				t.Fatalf("the port plan has no %s gRPC port", kmsName(r, i))
			}
			want[r] = append(want[r], plan[j].Addr())
		}
	}
	if diff := cmp.Diff(want, endpoints); diff != "" {
		t.Errorf("README snippet: kmsclient.WithEndpoints do not match the KMS servers of `make up` (PortPlan(%d, %v)) (-want +got):\n%s",
			DefaultBasePort, DefaultRegions, diff)
	}
	if !slices.Equal(regionOrder, DefaultRegions) {
		t.Errorf("README snippet: regions %v, want %v in that order", regionOrder, DefaultRegions)
	}

	certs := filepath.Join(DefaultStateDir, "certs")
	cert, key := devca.LeafPaths(certs, spiffeid.RequireFromString("spiffe://"+DefaultTrustDomain+"/client/us-east/demo"))
	if wantID := []string{cert, key, filepath.Join(certs, "ca.pem")}; !slices.Equal(identity, wantID) {
		t.Errorf("README snippet: kmsclient.WithIdentityFiles(%q), want the us-east demo client of `make up`: %q", identity, wantID)
	}
	if len(aeadArgs) != 2 || !slices.Contains(DefaultRegions, aeadArgs[0]) || !slices.Contains(demoKeysets, aeadArgs[1]) {
		t.Errorf("README snippet: client.AEAD(%q), want a region of %v and a demo keyset of %v", aeadArgs, DefaultRegions, demoKeysets)
	}
}
