package main

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
)

// TestDefaultStoreIsUnderState runs the command from a fresh working
// directory (as `go run ./examples/blobstore` from the repository root):
// without --store the objects go to .state/blobstore, nothing lands in the
// working directory itself; --store goes where it says.
func TestDefaultStoreIsUnderState(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	_, cert, key := pki.Issue("spiffe://"+identitytest.TrustDomain.Name()+"/client/us-east/app", devca.LeafOptions{})
	wd := t.TempDir()
	t.Chdir(wd)
	// list reads the store only: no KMS is called.
	flags := []string{"--kms", "us-east=127.0.0.1:1", "--cert", cert, "--key-file", key, "--ca", pki.BundleFile()}
	for _, tt := range []struct {
		name  string
		args  []string
		store string
	}{
		{"default", nil, filepath.Join(wd, ".state", "blobstore")},
		{"--store", []string{"--store", "mine"}, filepath.Join(wd, "mine")},
	} {
		t.Run(tt.name, func(t *testing.T) {
			args := append(append(slices.Clone(flags), tt.args...), "list")
			var stdout, stderr bytes.Buffer
			if code := run(t.Context(), args, nil, &stdout, &stderr); code != 0 || !strings.HasPrefix(stdout.String(), "NAME") {
				t.Fatalf("blobstore %q = %d, stdout %q, stderr %q; want 0 and an empty listing", args, code, stdout.String(), stderr.String())
			}
			if fi, err := os.Stat(tt.store); err != nil || !fi.IsDir() || fi.Mode().Perm() != 0o700 {
				t.Errorf("blobstore %q: store %s: %v, %v; want a 0700 directory", args, tt.store, fi, err)
			}
		})
	}
	entries, err := os.ReadDir(wd)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if want := []string{".state", "mine"}; !slices.Equal(names, want) {
		t.Errorf("working directory holds %v, want %v (the default store is under .state)", names, want)
	}
}
