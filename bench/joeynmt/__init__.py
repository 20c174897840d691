"""Peer benchmark: aligna against JoeyNMT 2.3.0 with the same model size, data and batches.

    python -m bench.joeynmt train-speed configs/multi30k_de_en_transformer.yaml [--steps 30] [--threads 2]
    python -m bench.joeynmt train configs/multi30k_de_en_transformer.yaml [--max-steps N] [--overwrite]
    python -m bench.joeynmt train CONFIG --existing runs/peer/joeynmt/NAME   # curve of a run made before
    python -m bench.joeynmt translate-speed configs/multi30k_de_en_transformer.yaml \\
        [--joey-model runs/peer/joeynmt/multi30k_de_en_transformer] [--batch-sizes 1 16 64] [--beams 1 5] \\
        [--precisions fp32 bf16]
    ... --venv /work/joey_venv     # use this JoeyNMT virtualenv (default runs/peer/joeynmt-venv, made if missing)
    ... --set train.batch_tokens=2000 --name tmp_try   # aligna config overrides; record name

Run from the repository root with aligna's venv. aligna runs in this process; JoeyNMT runs in
its own virtualenv through bench/joeynmt/driver.py. The JoeyNMT config is derived from
the aligna config (`joey_config`) and everything JoeyNMT reads is written under
runs/peer/work/NAME-HASH/. Records go to bench/results/peer_joeynmt_{train_speed,train,
translate_speed}_NAME.json.

The package: joey_config.py translates the aligna config (model, training, testing, and the
data, vocabularies and batch size JoeyNMT is given), joey_venv.py makes JoeyNMT's virtualenv
and runs driver.py in it, commands.py holds the three commands and their records, and
__main__.py is `python -m bench.joeynmt`. driver.py imports JoeyNMT, torch and yaml only and
is run by path, which puts this directory first on its module search path: no module here has a
top-level name such as config or venv that code in JoeyNMT's virtualenv might import.

- train-speed: --steps timed updates after --warmup untimed ones, on the first batches of
  epoch 1, for each side. Timed: the update alone (forward, loss, backward, clipping,
  optimizer and scheduler step) with its batch already built: aligna through
  bench/train_speed.py `measure`, JoeyNMT by the driver calling TrainManager's own step code.
  JoeyNMT's time to fetch each batch from its DataLoader (sampling, tokenizing, collating)
  is reported apart. Target tokens count non-pad target tokens, <eos> included, on both.
- train: full JoeyNMT training into runs/peer/joeynmt/NAME/. The record has the dev BLEU
  (tok_bleu) of every validation against `seconds` since the training loop started (JoeyNMT's
  "EPOCH 1" log line; validation time included) and `train_seconds` (validation left out:
  the driver logs each validation's duration), and the same curve of the aligna run in the
  config's model_dir when there is one (`seconds` since its "training: N batches per epoch"
  log line, `train_seconds` from the validation history in its latest checkpoint).
- translate-speed: decodes data.test with aligna's trained model (config.model_dir, best
  weights) and a trained JoeyNMT model, for each (beam, batch size): seconds without model
  loading (tokenizing and detokenizing included), sentences/s, output tokens/s, tok_bleu;
  aligna in each of --precisions (fp32, bf16 autocast, int8 weights), JoeyNMT in fp32 (its only
  CPU mode).

Made equal: the training pairs (those aligna keeps after its max_len filter, whitespace
normalized), the vocabularies (aligna's own, written as JoeyNMT voc_files: taken from
config.model_dir when it holds a model with the same data settings, else rebuilt with
aligna's Pipeline.build, which trains the same sentencepiece model), the sentencepiece model
file, the model sizes, optimizer, betas, weight decay, peak learning rate and warmup,
gradient-norm clipping, label smoothing, loss per target token, seed, fp32, greedy
validation with 64 sentences per batch, tok_bleu (sacrebleu tokenize=none, lowercase), no
length penalty and no minimum length in translate-speed, threads (--threads).

What still differs:

Data and vocabulary
- JoeyNMT puts its own specials first (<unk> <pad> <s> </s>): same tokens and sizes, other ids.
- JoeyNMT's venv has sentencepiece 0.2.1 (JoeyNMT 2.3.0 needs an API that 0.2.2 removed);
  it reads the same model file.
- BPE: JoeyNMT restricts sentencepiece to the vocabulary (SetVocabulary), so a piece never seen
  in training is split into known pieces; aligna maps it to <unk>. Rare on dev and test.
- JoeyNMT tokenizes each sentence whenever a batch is drawn (twice: sampler and collate);
  aligna once before training.
Batching
- aligna sorts sentences into length buckets and fills a batch while sentences x longest
  sentence (either side) stays within batch_tokens. JoeyNMT has no buckets: sentences in random
  order join a batch until sentences x longest (source + 1 or target + 1) reaches batch_size,
  the crossing sentence included, so its batches carry far more padding. --joey-batch matched
  (default) picks JoeyNMT's batch_size by simulating its sampler on the same lengths so that the
  mean number of real target tokens per update equals aligna's (so also the updates per epoch;
  about twice aligna's number on Multi30k); --joey-batch nominal gives it aligna's number.
  Both numbers and the per-update means are in every record.
Transformer
- JoeyNMT has one dropout per stack: 0.3 also on attention weights and inside the
  feed-forward network, where aligna uses attention_dropout and activation_dropout (0.1).
- JoeyNMT's output layer has no bias; its LayerNorms use eps 1e-6 (aligna 1e-5).
- Init: xavier_uniform matrices and N(0, d_model^-1/2) embeddings on both; JoeyNMT zeroes
  the biases, aligna keeps torch's default bias init.
RNN with attention (multi30k_de_en_bahdanau)
- JoeyNMT's recurrent decoder always attends after the recurrence (Luong's layout), whatever
  the scorer: s_t = GRU([E y_{t-1}; h~_{t-1}], s_{t-1}) (input feeding), c_t = attention with
  query s_t, h~_t = tanh(W [s_t; c_t]), logits = W_o h~_t. aligna's Bahdanau decoder queries
  with s_{t-1}, feeds c_t into the GRU and predicts from [s_t; c_t; E y_{t-1}]. The additive
  scorer, the sizes (embeddings 256, biGRU 512 encoder, GRU 512 decoder, attention 512) and the
  tanh bridge from the final encoder states are the same; the parameter counts differ (both
  in the records; 13.0M JoeyNMT vs 20.6M aligna, mostly aligna's wider output layer). Dropout 0.5 acts on JoeyNMT's [E y; h~] input and on [s_t; c_t] before W.
  (aligna's concat and general scorers use the Luong layout, as JoeyNMT does.)
- Init: JoeyNMT uniform(+-1/sqrt(hidden)) weights and biases and N(0, 1) embeddings, near
  torch's defaults, which aligna keeps (an LSTM also gets JoeyNMT's forget-gate bias 1).
- JoeyNMT needs a bidirectional encoder and a decoder with attention (bahdanau, general or
  concat); tied output embeddings need emb_dim == hidden_size there.
Training
- Label smoothing: JoeyNMT gives eps/(V-2) to every non-gold, non-pad token (KL divergence
  against a materialized tokens x V distribution); aligna eps/V to every token.
- Learning rate: JoeyNMT steps its scheduler after each update, so update 1 runs at the peak
  learning_rate and update n at the rate of step n-1. A constant rate is JoeyNMT's
  exponential schedule with decay 1.0. learning_rate_min is 1e-8 so that JoeyNMT's stop on a
  low rate never fires during warmup. aligna's plateau schedule and a constant rate with
  warmup have no working JoeyNMT 2.3.0 counterpart (its plateau and warmupexponentialdecay
  schedulers fail to build with torch 2.13).
- JoeyNMT has no early stopping: it trains all epochs (or --max-steps); aligna stops after
  early_stopping_patience validations without improvement.
- aligna validates once per epoch (validate_every 0); JoeyNMT every validation_freq updates:
  its updates in epoch 1 as simulated (or --validate-every); later epochs may differ by one.
- aligna computes dev loss, ppl, tok_bleu, bleu, chrF and saves a checkpoint at every
  validation (safetensors); JoeyNMT computes loss, ppl, accuracy and BLEU and saves (torch.save,
  with the optimizer) only validations among its keep_best_ckpts best.
- Teacher forcing below 1 (scheduled sampling) and bf16/fp16 have no JoeyNMT counterpart here.
Decoding
- Length limit: aligna a * |x| + b tokens per sentence (<eos> included, decode.max_len_a/b);
  JoeyNMT one max_output_length for all sentences, set to the largest a * |x| + b over the
  sentences decoded: never shorter, and longer for a short sentence that never ends.
- JoeyNMT keeps its batches in file order; aligna sorts by length before batching.
- Beam search: aligna ends a sentence when it has k finished hypotheses (or its limit),
  JoeyNMT when all k live beams end in <eos>. JoeyNMT never emits <s> or <pad> and turns an
  empty output into <unk>; aligna returns "".
- JoeyNMT's Transformer decoder recomputes the whole prefix at every step; aligna keeps a
  key/value cache.
"""
