package fsm_test

import (
	"go/parser"
	"go/token"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestNoGRPCImport keeps the FSM a pure domain package: none of its files
// imports gRPC. (The generated rootkmsv1 package it uses for the wire format
// also holds the gRPC service stubs, so gRPC is still linked in indirectly.)
func TestNoGRPCImport(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(token.NewFileSet(), name, nil, parser.ImportsOnly)
		if err != nil {
			t.Fatalf("ParseFile(%s) = %v", name, err)
		}
		checked++
		for _, imp := range f.Imports {
			p, _ := strconv.Unquote(imp.Path.Value)
			if p == "google.golang.org/grpc" || strings.HasPrefix(p, "google.golang.org/grpc/") {
				t.Errorf("%s imports %q, want no gRPC in the FSM", name, p)
			}
		}
	}
	if checked == 0 {
		t.Fatalf("no Go files checked; the glob is broken")
	}
}
