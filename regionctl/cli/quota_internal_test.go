package cli

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/testing/protocmp"

	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
)

func TestParseFileQuotas(t *testing.T) {
	tests := []struct {
		data        string
		wantQuotas  []*bundlev1.Quota
		wantDefault *bundlev1.Quota
		wantErr     string // "" means valid
	}{
		{`{}`, nil, nil, ""},
		{`{"quotas": {}}`, nil, nil, ""},
		{`{"quotas": {"default": {"requests_per_second": 1000, "burst": 2000, "max_concurrent": 64}}}`,
			nil, &bundlev1.Quota{RequestsPerSecond: 1000, Burst: 2000, MaxConcurrent: 64}, ""},
		{`{"quotas": {"callers": [{"pattern": "client/us-east/batch", "max_concurrent": 8}, {"pattern": "client/*/*", "requests_per_second": 50}]}}`,
			[]*bundlev1.Quota{{Pattern: "client/us-east/batch", MaxConcurrent: 8}, {Pattern: "client/*/*", RequestsPerSecond: 50}}, nil, ""},

		{`{"quotas": {"defaults": {}}}`, nil, nil, `unknown key "quotas.defaults"`},
		{`{"quotas": {"default": {"rps": 5}}}`, nil, nil, `unknown key "quotas.default.rps"`},
		{`{"quotas": {"callers": [{"pattern": "client/*/*", "Burst": 5}]}}`, nil, nil, `unknown key "quotas.callers[0].Burst"`},
		{`{"quotas": {"callers": [{"pattern": "a/b/c", "burst": 1, "burst": 2}]}}`, nil, nil, `key "quotas.callers[0].burst" appears twice`},
		{`{"quotas": {"default": {"requests_per_second": -1}}}`, nil, nil, "cannot unmarshal"},
		{`{"quotas": []}`, nil, nil, "want a JSON object"},
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
			qs, def := f.quotas()
			if diff := cmp.Diff(tt.wantQuotas, qs, protocmp.Transform()); diff != "" {
				t.Errorf("ParseFile(%s).quotas() (-want +got):\n%s", tt.data, diff)
			}
			if diff := cmp.Diff(tt.wantDefault, def, protocmp.Transform()); diff != "" {
				t.Errorf("ParseFile(%s).quotas() default (-want +got):\n%s", tt.data, diff)
			}
		})
	}
}
