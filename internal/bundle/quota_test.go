package bundle_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/cairnkms/cairn/internal/bundle"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
)

func TestValidateQuotas(t *testing.T) {
	q := func(pattern string, rps, burst, conc uint32) *bundlev1.Quota {
		return &bundlev1.Quota{Pattern: pattern, RequestsPerSecond: rps, Burst: burst, MaxConcurrent: conc}
	}
	many := make([]*bundlev1.Quota, bundle.MaxQuotas+1)
	for i := range many {
		many[i] = q("client/us-east/a", 1, 0, 0)
	}
	tests := []struct {
		name    string
		quotas  []*bundlev1.Quota
		def     *bundlev1.Quota
		wantErr string // "" means valid
	}{
		{"none", nil, nil, ""},
		{"rate, burst and concurrency", []*bundlev1.Quota{q("client/us-east/*", 100, 200, 8)}, nil, ""},
		{"concurrency only", []*bundlev1.Quota{q("client/us-east/batch", 0, 0, 4)}, nil, ""},
		{"no limit (an exemption)", []*bundlev1.Quota{q("client/us-east/batch", 0, 0, 0), q("client/*/*", 10, 0, 0)}, nil, ""},
		{"full URI pattern", []*bundlev1.Quota{q("spiffe://cairn.test/client/us-east/*", 10, 0, 0)}, nil, ""},
		{"default", nil, q("", 1000, 2000, 64), ""},

		{"no pattern", []*bundlev1.Quota{q("", 10, 0, 0)}, nil, "quota 0: no pattern"},
		{"bad pattern", []*bundlev1.Quota{q("client/us-east", 10, 0, 0)}, nil, "quota 0:"},
		{"partial wildcard", []*bundlev1.Quota{q("client/us-*/x", 10, 0, 0)}, nil, "quota 0:"},
		{"same pattern twice", []*bundlev1.Quota{q("client/*/x", 10, 0, 0), q("client/*/x", 20, 0, 0)}, nil, "is quota 0's already"},
		{"same pattern, relative and full", []*bundlev1.Quota{q("client/*/x", 10, 0, 0), q("spiffe://cairn.test/client/*/x", 20, 0, 0)}, nil, "is quota 0's already"},
		{"burst without rate", []*bundlev1.Quota{q("client/*/x", 0, 10, 0)}, nil, "burst without requests_per_second"},
		{"too many", many, nil, "quotas, more than"},
		{"default with a pattern", nil, q("client/*/*", 10, 0, 0), "default_quota: has pattern"},
		{"default burst without rate", nil, q("", 0, 10, 0), "default_quota: burst without"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := validBundle(t)
			b.Quotas, b.DefaultQuota = tt.quotas, tt.def
			err := bundle.Validate(b)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Errorf("Validate(%s) = %v, want nil", tt.name, err)
			case tt.wantErr != "" && (!errors.Is(err, bundle.ErrInvalid) || !strings.Contains(err.Error(), tt.wantErr)):
				t.Errorf("Validate(%s) = %v, want ErrInvalid containing %q", tt.name, err, tt.wantErr)
			}
		})
	}
}
