package cli

import (
	"testing"
	"time"

	"github.com/cairnkms/cairn/internal/safety"
)

// TestPropagationWindow: the root KMS's window rules; a local setting can
// only lengthen it.
func TestPropagationWindow(t *testing.T) {
	tests := []struct {
		name             string
		flag, file, root time.Duration
		want             time.Duration
	}{
		{"nothing known", 0, 0, 0, safety.DefaultWindow},
		{"the root KMS's", 0, 0, 2 * time.Second, 2 * time.Second},
		{"the config file's, no root KMS answer", 0, time.Hour, 0, time.Hour},
		{"a shorter flag does not shorten the root KMS's", time.Second, 0, time.Minute, time.Minute},
		{"a longer flag lengthens it", time.Hour, 0, time.Minute, time.Hour},
		{"the flag wins over the file", 2 * time.Hour, time.Hour, 0, 2 * time.Hour},
		{"a shorter file does not shorten the root KMS's", 0, time.Second, time.Minute, time.Minute},
	}
	for _, tt := range tests {
		o := &options{window: tt.flag, rootWindow: tt.root, file: &File{window: tt.file}}
		if got := o.propagationWindow(); got != tt.want {
			t.Errorf("%s: propagationWindow() = %v, want %v", tt.name, got, tt.want)
		}
	}
}
