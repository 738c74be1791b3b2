package config_test

import (
	"fmt"

	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/regionctl/config"
)

func ExampleParse() {
	team, err := config.Parse([]byte(`{"team":"payments","keysets":[{
		"name":"payments/ledger","regions":["us-east","eu-west"],"purpose":"envelope","template":"AES256_GCM",
		"rotation_period":"2160h","ciphertext_ttl":"8760h",
		"acl":{"encrypt":["client/us-east/*"],"decrypt":["client/*/ledger"],"generate_data_key":[],"rewrap":[]}}]}`),
		identitytest.TrustDomain)
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, k := range team.Keysets {
		fmt.Println(k.Name, k.Regions, k.RotationPeriod, k.CiphertextTTL, k.ACL.Encrypt)
	}

	_, err = config.Parse([]byte(`{"team":"payments","keysets":[{"name":"search/index"}]}`), identitytest.TrustDomain)
	fmt.Println(err)
	// Output:
	// payments/ledger [us-east eu-west] 2160h0m0s 8760h0m0s [client/us-east/*]
	// config: invalid team config: keysets[0] ("search/index"): the names of team "payments"'s keysets start with "payments/"
}
