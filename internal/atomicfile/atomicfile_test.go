package atomicfile_test

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"go.uber.org/goleak"

	"github.com/cairnkms/cairn/internal/atomicfile"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestWriteAndCreate(t *testing.T) {
	tests := []struct {
		name     string
		write    func(path string, data []byte, mode os.FileMode) error
		existing bool
		mode     os.FileMode
		wantErr  error
		want     string
	}{
		{"Write new", atomicfile.Write, false, 0o600, nil, "new"},
		{"Write replaces", atomicfile.Write, true, 0o640, nil, "new"},
		{"Create new", atomicfile.Create, false, 0o600, nil, "new"},
		{"Create refuses existing", atomicfile.Create, true, 0o600, atomicfile.ErrExists, "old"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "f")
			if tt.existing {
				if err := os.WriteFile(path, []byte("old"), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			err := tt.write(path, []byte("new"), tt.mode)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("%s = %v, want %v", tt.name, err, tt.wantErr)
			}
			if got, _ := os.ReadFile(path); string(got) != tt.want {
				t.Errorf("content after %s = %q, want %q", tt.name, got, tt.want)
			}
			if fi, _ := os.Stat(path); tt.wantErr == nil && fi.Mode().Perm() != tt.mode {
				t.Errorf("mode after %s = %v, want %v", tt.name, fi.Mode().Perm(), tt.mode)
			}
			if entries, _ := os.ReadDir(dir); len(entries) != 1 {
				t.Errorf("%s left %d entries in the directory, want 1 (no temporary files)", tt.name, len(entries))
			}
		})
	}
	if err := atomicfile.Write(filepath.Join(t.TempDir(), "missing", "f"), nil, 0o600); err == nil {
		t.Errorf("Write(in a missing directory) = nil, want an error")
	}
}
