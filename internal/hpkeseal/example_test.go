package hpkeseal_test

import (
	"fmt"

	"github.com/cairnkms/cairn/internal/hpkeseal"
)

func Example() {
	// Both sides bind the exchange to its purpose and parties.
	info, err := hpkeseal.Info("cairn/example/v1", "spiffe://cairn/requester", "spiffe://cairn/responder")
	if err != nil {
		fmt.Println(err)
		return
	}

	// The requester makes an ephemeral key and sends its public half.
	r, err := hpkeseal.NewRecipient()
	if err != nil {
		fmt.Println(err)
		return
	}
	defer r.Close()
	request := r.PublicKey()

	// The responder seals the key to it.
	key := []byte("0123456789abcdef0123456789abcdef")
	sealed, err := hpkeseal.Seal(request, info, key)
	clear(key)
	if err != nil {
		fmt.Println(err)
		return
	}

	// The requester opens the reply.
	opened, err := r.Open(sealed, info)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer opened.Wipe()
	fmt.Println(opened.Len(), opened, r)

	// Under any other info the message does not open.
	_, err = r.Open(sealed, []byte("cairn/example/v1"))
	fmt.Println(err)
	// Output:
	// 32 secret.Bytes(REDACTED) hpkeseal.Recipient(REDACTED)
	// hpkeseal: cannot open sealed message
}
