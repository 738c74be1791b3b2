package compile_test

import (
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/cairnkms/cairn/internal/bundle"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/regionctl/compile"
	"github.com/cairnkms/cairn/regionctl/config"
)

// TestCompileMessageBudget: every keyset carries the limit (the default
// when none is given) and every version its recorded fleet encrypt count.
func TestCompileMessageBudget(t *testing.T) {
	p := &statev1.KeysetVersionRecord{KeyId: 4, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY, EncryptCount: 1_100_000_000}
	v := &statev1.KeysetVersionRecord{KeyId: 5, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED}
	old := &statev1.KeysetVersionRecord{KeyId: 3, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED, EncryptCount: 1 << 33}
	teams := []*config.Team{team("pay", config.Keyset{Name: "pay/a", Regions: []string{"us-east"}, CiphertextTTL: time.Hour, RotationPeriod: time.Hour})}
	tests := []struct {
		name      string
		limit     uint64
		wantLimit uint64
	}{
		{"default", 0, bundle.DefaultEncryptLimit},
		{"lowered", 5, 5},
		{"raised", 1 << 40, 1 << 40},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := rec("pay/a", []string{"us-east"}, time.Hour, time.Hour, old, p, v)
			res, err := compile.Compile(compile.Input{Region: "us-east", Serial: 1, CreatedBy: createdBy, CreatedAt: at, Teams: teams,
				Record: []*statev1.KeysetRecord{r}, Window: time.Minute, EncryptLimit: tt.limit})
			if err != nil || len(res.Problems) != 0 {
				t.Fatalf("Compile = %v, %v", res, err)
			}
			k := res.Bundle.GetKeysets()[0]
			if got := k.GetEncryptLimit(); got != tt.wantLimit {
				t.Errorf("encrypt_limit = %d, want %d", got, tt.wantLimit)
			}
			counts := map[uint32]uint64{}
			for _, l := range k.GetLifecycle() {
				counts[l.GetKeyId()] = l.GetEncryptCount()
			}
			// A count past the limit is no bad bundle: it is a version the
			// KMS refuses to encrypt with.
			want := map[uint32]uint64{3: 1 << 33, 4: 1_100_000_000, 5: 0}
			if diff := cmp.Diff(want, counts); diff != "" {
				t.Errorf("lifecycle encrypt_count mismatch (-want +got):\n%s", diff)
			}
		})
	}
}
