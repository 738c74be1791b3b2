package bundle_test

import (
	"testing"

	"github.com/cairnkms/cairn/internal/bundle"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
)

// TestValidateMessageBudget: every encrypt_limit and encrypt_count is
// valid; a count at or past the limit is a version the KMS refuses to
// encrypt with, not a bad bundle.
func TestValidateMessageBudget(t *testing.T) {
	tests := []struct {
		name      string
		limit     uint64
		count     uint64
		wantLimit uint64 // EncryptLimit
	}{
		{"no budget (a bundle built before it)", 0, 0, bundle.DefaultEncryptLimit},
		{"default limit, some use", 0, 1 << 30, bundle.DefaultEncryptLimit},
		{"limit 1", 1, 0, 1},
		{"count at the limit", 5, 5, 5},
		{"count past the limit", 5, 1 << 40, 5},
		{"largest", ^uint64(0), ^uint64(0), ^uint64(0)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := validBundle(t)
			k := b.Keysets[0]
			k.EncryptLimit = tt.limit
			k.Lifecycle = []*bundlev1.VersionLifecycle{{KeyId: k.Keyset.Versions[0].KeyId, EncryptCount: tt.count}}
			if err := bundle.Validate(b); err != nil {
				t.Errorf("Validate(limit %d, count %d) = %v, want nil", tt.limit, tt.count, err)
			}
			if got := bundle.EncryptLimit(k); got != tt.wantLimit {
				t.Errorf("EncryptLimit(limit %d) = %d, want %d", tt.limit, got, tt.wantLimit)
			}
		})
	}
}
