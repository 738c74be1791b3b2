package cli

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/bundle"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
)

func TestParseFileMessageBudget(t *testing.T) {
	tests := []struct {
		data    string
		want    messageBudget
		wantErr string // "" means valid
	}{
		{`{}`, messageBudget{bundle.DefaultEncryptLimit, DefaultRotateAt}, ""},
		{`{"message_budget": {}}`, messageBudget{bundle.DefaultEncryptLimit, DefaultRotateAt}, ""},
		{`{"message_budget": {"limit": 4294967296, "rotate_at": 0.25}}`, messageBudget{1 << 32, 0.25}, ""},
		{`{"message_budget": {"limit": 1000}}`, messageBudget{1000, DefaultRotateAt}, ""},
		{`{"message_budget": {"limit": 0, "rotate_at": 1}}`, messageBudget{bundle.DefaultEncryptLimit, 1}, ""},
		{`{"message_budget": {"rotate_at": 0.5}}`, messageBudget{bundle.DefaultEncryptLimit, 0.5}, ""},

		{`{"message_budget": {"limit": 5, "rotate": 0.5}}`, messageBudget{}, `unknown key "message_budget.rotate"`},
		{`{"message_budget": {"Limit": 5}}`, messageBudget{}, `unknown key "message_budget.Limit"`},
		{`{"message_budget": {"limit": 5, "limit": 6}}`, messageBudget{}, `key "message_budget.limit" appears twice`},
		{`{"message_budget": {"limit": -1}}`, messageBudget{}, "cannot unmarshal"},
		{`{"message_budget": {"limit": 4.2e9}}`, messageBudget{}, "cannot unmarshal"},
		{`{"message_budget": {"limit": "4294967296"}}`, messageBudget{}, "cannot unmarshal"},
		{`{"message_budget": {"rotate_at": 0}}`, messageBudget{}, "message_budget.rotate_at 0: want a fraction of the limit in (0, 1]"},
		{`{"message_budget": {"rotate_at": 1.5}}`, messageBudget{}, "message_budget.rotate_at 1.5"},
		{`{"message_budget": {"rotate_at": -0.25}}`, messageBudget{}, "message_budget.rotate_at -0.25"},
		{`{"message_budget": null}`, messageBudget{}, "want a JSON object"},
		{`{"message_budget": 4294967296}`, messageBudget{}, "want a JSON object"},
	}
	for _, tt := range tests {
		t.Run(tt.data, func(t *testing.T) {
			f, err := ParseFile([]byte(tt.data))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("ParseFile(%s) = %v, want an error containing %q", tt.data, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseFile(%s) = %v", tt.data, err)
			}
			if got := f.budget(); got != tt.want {
				t.Errorf("ParseFile(%s).budget() = %+v, want %+v", tt.data, got, tt.want)
			}
			if got := f.encryptLimit(); got != tt.want.limit {
				t.Errorf("ParseFile(%s).encryptLimit() = %d, want %d", tt.data, got, tt.want.limit)
			}
		})
	}
}

func TestRotationDue(t *testing.T) {
	now := time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC)
	const period = 30 * 24 * time.Hour
	primary := func(since time.Duration, count uint64) *statev1.KeysetVersionRecord {
		return &statev1.KeysetVersionRecord{KeyId: 1, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY,
			CreatedAt: timestamppb.New(now.Add(-since)), PrimarySince: timestamppb.New(now.Add(-since)), EncryptCount: count}
	}
	waiting := &statev1.KeysetVersionRecord{KeyId: 2, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED}
	superseded := &statev1.KeysetVersionRecord{KeyId: 0, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED,
		PrimarySince: timestamppb.New(now.Add(-90 * 24 * time.Hour)), SupersededAt: timestamppb.New(now.Add(-time.Hour)), EncryptCount: 1 << 40}
	lowered := messageBudget{limit: 5, rotateAt: 0.25} // due at 1.25, i.e. 2 encryptions
	def := messageBudget{limit: bundle.DefaultEncryptLimit, rotateAt: DefaultRotateAt}
	tests := []struct {
		name     string
		versions []*statev1.KeysetVersionRecord
		period   time.Duration
		mb       messageBudget
		want     string // "" means not due; else what why contains
	}{
		{"fresh, unused", []*statev1.KeysetVersionRecord{primary(time.Hour, 0)}, period, lowered, ""},
		{"one short of rotate_at", []*statev1.KeysetVersionRecord{primary(time.Hour, 1)}, period, lowered, ""},
		{"at rotate_at", []*statev1.KeysetVersionRecord{primary(time.Hour, 2)}, period, lowered, "message budget: 2 of 5 encryptions, rotate at 0.25"},
		{"past the limit", []*statev1.KeysetVersionRecord{primary(time.Hour, 9)}, period, lowered, "message budget: 9 of 5 encryptions"},
		{"no rotation period, budget spent", []*statev1.KeysetVersionRecord{primary(time.Hour, 3)}, 0, lowered, "message budget: 3 of 5"},
		{"rotate_at 1", []*statev1.KeysetVersionRecord{primary(time.Hour, 4)}, period, messageBudget{limit: 5, rotateAt: 1}, ""},
		{"rotate_at 1, at the limit", []*statev1.KeysetVersionRecord{primary(time.Hour, 5)}, period, messageBudget{limit: 5, rotateAt: 1}, "message budget: 5 of 5"},
		{"default budget, 1.1e9", []*statev1.KeysetVersionRecord{primary(time.Hour, 1_100_000_000)}, period, def, "message budget: 1.1e9 of 4.3e9 encryptions, rotate at 0.25"},
		{"default budget, just under a quarter", []*statev1.KeysetVersionRecord{primary(time.Hour, 1<<30-1)}, period, def, ""},
		{"default budget, a quarter", []*statev1.KeysetVersionRecord{primary(time.Hour, 1<<30)}, period, def, "message budget: 1.1e9 of 4.3e9"},
		{"rotation period over", []*statev1.KeysetVersionRecord{primary(period, 0)}, period, lowered, "rotation period 720h0m0s"},
		{"both", []*statev1.KeysetVersionRecord{primary(period+time.Hour, 3)}, period, lowered, "rotation period 720h0m0s; message budget: 3 of 5"},
		{"a newer version waits", []*statev1.KeysetVersionRecord{primary(period, 3), waiting}, period, lowered, ""},
		{"an old version's count does not count", []*statev1.KeysetVersionRecord{superseded, primary(time.Hour, 0)}, period, lowered, ""},
		{"no primary", []*statev1.KeysetVersionRecord{waiting}, period, lowered, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := &statev1.KeysetRecord{Name: "pay/a", RotationPeriod: durationpb.New(tt.period), Versions: tt.versions}
			why, due := rotationDue(rec, tt.mb, now)
			if due != (tt.want != "") || !strings.Contains(why, tt.want) {
				t.Errorf("rotationDue(%s) = %q, %v, want due %v (%q)", tt.name, why, due, tt.want != "", tt.want)
			}
		})
	}
}

func TestCount(t *testing.T) {
	tests := []struct {
		n    uint64
		want string
	}{
		{0, "0"}, {5, "5"}, {999_999, "999999"}, {1_000_000, "1.0e6"}, {1_100_000_000, "1.1e9"},
		{1 << 30, "1.1e9"}, {1 << 32, "4.3e9"}, {9_960_000_000, "1.0e10"}, {^uint64(0), "1.8e19"},
	}
	for _, tt := range tests {
		if got := count(tt.n); got != tt.want {
			t.Errorf("count(%d) = %q, want %q", tt.n, got, tt.want)
		}
	}
}
